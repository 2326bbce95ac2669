//! `--config FILE`: a TOML file whose top-level keys are the binary's long flag names
//! (`listen = "0.0.0.0:8443"`, `max-sessions = 4096`, `deny = ["10.0.0.0/8"]`).
//!
//! Design: clap stays the one place that knows the options and parses their values, and
//! the file feeds it. Each key is looked up among the command's arguments (so there is no
//! second list of keys to keep in step), and each value is parsed at once by that
//! argument's own value parser, with the line the key is on kept, so a bad value or an
//! unknown key is reported as `FILE:LINE: KEY: why`, not as if it were a flag. Typed serde
//! structs would have meant a second definition of every option beside the `Args` structs.
//! The checked values then become arguments placed before the real ones and clap parses
//! the lot, so the command line wins: a flag given on the command line (or through its
//! environment variable, such as `ANYTLS_PASSWORD`) makes the file's value for it ignored,
//! for repeatable flags too (the file's list is replaced, not extended). Rules between
//! flags (`requires`, `conflicts_with`) are checked on that merged command line.
//!
//! The server's `[[users]]` tables (`name`, `password`) become `--user NAME:PASSWORD`, or
//! with a plan (`quota-bytes = …`, see docs/users.md) the hidden `--user-json {…}`, and
//! `[[route]]` and `[[upstream]]` tables (docs/routing.md) the hidden `--route-json {…}`
//! and `--upstream-json {…}`, in order.
//! These arguments live only in this process's memory: unlike real arguments they never
//! show in `/proc/PID/cmdline` or `ps`.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};
use toml_edit::{Document, Item, Table, Value};

/// The long name of the flag that names the file.
pub const CONFIG_FLAG: &str = "config";

/// `argv` with the arguments of its `--config FILE` (if any) inserted after the program
/// name, minus those the command line (or the environment) already sets.
pub fn command_line_with_config(argv: Vec<String>, command: &Command) -> Result<Vec<String>, String> {
    let Some(path) = config_path(&argv) else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config: cannot read {}: {e}", path.display()))?;
    let from_file = config_arguments(&text, &path.display().to_string(), command)?;
    Ok(merge(argv, from_file, command))
}

/// The program name, the file's arguments the command line does not override, then the
/// command line's own.
fn merge(argv: Vec<String>, from_file: Vec<(String, String)>, command: &Command) -> Vec<String> {
    let given = set_outside_the_file(&argv, command);
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    let mut argv = argv.into_iter();
    out.extend(argv.next());
    out.extend(from_file.into_iter().filter(|(id, _)| !overridden(id, &given, command)).map(|(_, arg)| arg));
    out.extend(argv);
    out
}

/// Whether the file's value for `id` gives way: the flag, or one it conflicts with
/// (`--password` and `--password-file`), is set outside the file.
fn overridden(id: &str, given: &HashSet<String>, command: &Command) -> bool {
    if given.contains(id) {
        return true;
    }
    // Conflicts are declared on one side only, so look both ways.
    let conflicts = |a: &Arg, b: &str| command.get_arg_conflicts_with(a).iter().any(|other| other.get_id() == b);
    command.get_arguments().any(|arg| {
        let other = arg.get_id().as_str();
        (arg.get_id() == id && given.iter().any(|g| conflicts(arg, g))) || (given.contains(other) && conflicts(arg, id))
    })
}

/// The value of `--config FILE` / `--config=FILE` on the command line.
pub fn config_path(argv: &[String]) -> Option<PathBuf> {
    let long = format!("--{CONFIG_FLAG}");
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--" {
            return None;
        }
        if *arg == long {
            return args.next().map(PathBuf::from);
        }
        if let Some(value) = arg.strip_prefix(&long).and_then(|rest| rest.strip_prefix('=')) {
            return Some(PathBuf::from(value));
        }
    }
    None
}

/// Where in the file a mistake is: the file's name and the text, to turn spans into lines.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    /// `NAME:LINE: why`, the line being the one `span` starts on (`NAME: why` without one).
    fn error(&self, span: Option<Range<usize>>, why: impl std::fmt::Display) -> String {
        match span {
            Some(span) => format!("{}:{}: {why}", self.name, self.line_of(span.start)),
            None => format!("{}: {why}", self.name),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.text.get(..offset).unwrap_or(self.text).matches('\n').count() + 1
    }
}

/// The file's keys as `(arg id, --long=value)` pairs, each key checked against `command`
/// and each value parsed by its argument; errors read `FILE:LINE: ...`, FILE being
/// `file_name`.
pub fn config_arguments(text: &str, file_name: &str, command: &Command) -> Result<Vec<(String, String)>, String> {
    let source = Source { name: file_name, text };
    // `Document` (not `DocumentMut`) keeps every key's and value's place in the text.
    let document = Document::parse(text).map_err(|e| format!("{file_name}: {}", e.to_string().trim()))?;
    let root = document.as_table();
    let mut out = Vec::new();
    for (key, item) in root.iter() {
        let span = root.key(key).and_then(|k| k.span());
        if key == CONFIG_FLAG {
            return Err(source.error(span, "`config` cannot be set inside a config file"));
        }
        if key == "users"
            && let Some(user) = find_long(command, "user")
        {
            let with_plans = find_long(command, USER_JSON_FLAG);
            for entry in users(item, &source, with_plans.is_some())? {
                // Under `--user`'s id, so a `--user` on the command line replaces them all.
                out.push((user.get_id().to_string(), entry));
            }
            continue;
        }
        if let Some(kind) = TABLES.iter().find(|kind| kind.section == key)
            && let Some(flag) = find_long(command, kind.flag)
        {
            for entry in kind.arguments(item, &source)? {
                out.push((flag.get_id().to_string(), entry));
            }
            continue;
        }
        let Some(arg) = find_long(command, key).filter(|arg| !arg.is_hide_set()) else {
            let known = command.get_arguments().filter(|a| !a.is_hide_set()).filter_map(|a| a.get_long());
            let hint = did_you_mean(key, known).map(|near| format!("; did you mean `{near}`?")).unwrap_or_default();
            return Err(
                source.error(span, format!("unknown key `{key}` (keys are the long flag names of --help){hint}"))
            );
        };
        let id = arg.get_id().to_string();
        let values = item_values(item).map_err(|why| source.error(span.clone(), format!("{key}: {why}")))?;
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match values.as_slice() {
                [(flag, _)] if flag == "true" => out.push((id, format!("--{key}"))),
                [(flag, _)] if flag == "false" => {}
                _ => return Err(source.error(span, format!("`{key}` is a switch: true or false"))),
            }
            continue;
        }
        if values.len() > 1 && !matches!(arg.get_action(), ArgAction::Append) {
            return Err(source.error(span, format!("`{key}` takes one value, not a list")));
        }
        let arguments: Vec<String> = values.iter().map(|(value, _)| format!("--{key}={value}")).collect();
        if let Some(why) = value_error(command, &arguments) {
            // The element that failed, for a list spread over several lines.
            let failed = why.value.as_ref().and_then(|bad| values.iter().find(|(value, _)| value == bad));
            let span = failed.and_then(|(_, span)| span.clone()).or(span);
            return Err(source.error(span, format!("{key}: {}", why.message)));
        }
        out.extend(arguments.into_iter().map(|argument| (id.clone(), argument)));
    }
    Ok(out)
}

/// Why clap refused a value, in words that fit after `FILE:LINE: KEY: `.
struct ValueError {
    value: Option<String>,
    message: String,
}

/// The error clap's own parser finds in `arguments` (one key's values), if it is about a
/// value: other errors, such as a required flag missing, are not this key's to report.
fn value_error(command: &Command, arguments: &[String]) -> Option<ValueError> {
    let name = command.get_name().to_string();
    let argv = std::iter::once(name).chain(arguments.iter().cloned());
    let error = command.clone().try_get_matches_from(argv).err()?;
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    let quoted = value.as_ref().map(|v| format!("invalid value {v:?}")).unwrap_or_else(|| "invalid value".into());
    let message = match error.kind() {
        ErrorKind::ValueValidation => match std::error::Error::source(&error) {
            Some(why) => format!("{quoted}: {why}"),
            None => quoted,
        },
        ErrorKind::InvalidValue => match error.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(names)) => format!("{quoted} (possible values: {})", names.join(", ")),
            _ => quoted,
        },
        _ => return None,
    };
    Some(ValueError { value, message })
}

/// The hidden flag that carries a `[[users]]` table with a plan (`quota-bytes`, …) as JSON.
pub const USER_JSON_FLAG: &str = "user-json";

/// The keys of a `[[users]]` table besides `name` and `password`: the plan's.
const PLAN_KEYS: [&str; 8] =
    ["quota-bytes", "expires", "speed-up", "speed-down", "max-ips", "max-sessions", "enabled", "padding-scheme"];

/// `[[users]]` tables as arguments: `--user=NAME:PASSWORD`, or `--user-json={…}` for a
/// table with a plan (`plans`: the command takes them). Each plan value is checked here,
/// so a mistake names its line.
fn users(item: &Item, source: &Source, plans: bool) -> Result<Vec<String>, String> {
    let tables = item
        .as_array_of_tables()
        .ok_or_else(|| source.error(item.span(), "`users` must be [[users]] tables with name and password"))?;
    let mut out = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let field = |name: &str| table.get(name).and_then(Item::as_str).map(str::to_string);
        let line_of = |name: &str| key_span(table, name).or_else(|| table.span());
        let (Some(name), Some(password)) = (field("name"), field("password")) else {
            return Err(source.error(table.span(), "each [[users]] needs `name` and `password` (strings)"));
        };
        // A colon would move into the password on the way through `--user NAME:PASSWORD`,
        // and the user would be refused the password they were given.
        if name.is_empty() || name.contains(':') {
            return Err(source.error(
                line_of("name"),
                format!("[[users]] #{}: name {name:?} cannot be empty or contain `:` (the password may)", i + 1),
            ));
        }
        if password.is_empty() {
            return Err(
                source.error(line_of("password"), format!("[[users]] #{} ({name}): the password is empty", i + 1))
            );
        }
        let mut plan = serde_json::Map::new();
        for (key, value) in table.iter().filter(|(k, _)| *k != "name" && *k != "password") {
            if !plans || !PLAN_KEYS.contains(&key) {
                let known = if plans {
                    "name, password, ".to_string() + &PLAN_KEYS.join(", ")
                } else {
                    "name, password".into()
                };
                let keys = ["name", "password"]
                    .into_iter()
                    .chain(if plans { PLAN_KEYS.as_slice() } else { &[] }.iter().copied());
                let hint = did_you_mean(key, keys).map(|near| format!("; did you mean `{near}`?")).unwrap_or_default();
                return Err(source.error(line_of(key), format!("unknown key `{key}` in [[users]] ({known}){hint}")));
            }
            let checked = plan_value(key, value)
                .map_err(|why| source.error(line_of(key), format!("[[users]] #{} ({name}): {key}: {why}", i + 1)))?;
            plan.insert(key.to_string(), checked);
        }
        if plan.is_empty() {
            out.push(format!("--user={name}:{password}"));
        } else {
            let json = serde_json::json!({ "name": name, "password": password, "plan": plan });
            out.push(format!("--{USER_JSON_FLAG}={json}"));
        }
    }
    Ok(out)
}

/// One plan key's TOML value as the JSON the plan reads, checked by the plan itself.
fn plan_value(key: &str, value: &Item) -> Result<serde_json::Value, String> {
    let json = match value.as_value() {
        Some(Value::Integer(i)) => serde_json::Value::from(*i.value()),
        Some(Value::String(s)) => serde_json::Value::from(s.value().as_str()),
        Some(Value::Boolean(b)) => serde_json::Value::from(*b.value()),
        // An offset date-time written bare in TOML (`expires = 2030-01-01T00:00:00Z`).
        Some(Value::Datetime(d)) => serde_json::Value::from(d.value().to_string()),
        _ => return Err("expected an integer, a string or a boolean".into()),
    };
    let one = serde_json::json!({ key: json.clone() });
    serde_json::from_value::<crate::server::users::Plan>(one).map_err(|e| e.to_string())?;
    Ok(json)
}

/// The hidden flag that carries a `[[route]]` table as JSON.
pub const ROUTE_JSON_FLAG: &str = "route-json";
/// The hidden flag that carries an `[[upstream]]` table as JSON.
pub const UPSTREAM_JSON_FLAG: &str = "upstream-json";

/// An array of tables the file hands on as JSON, one hidden flag a table (docs/routing.md).
struct TableKind {
    section: &'static str,
    flag: &'static str,
    keys: &'static [&'static str],
    /// Keys holding file paths, taken from the config file's folder when relative.
    paths: &'static [&'static str],
    /// Whether the JSON has the table's shape (values are checked when it is used).
    parses: fn(serde_json::Value) -> Result<(), String>,
}

const TABLES: [TableKind; 2] = [
    TableKind {
        section: "route",
        flag: ROUTE_JSON_FLAG,
        keys: &crate::server::route::spec::RULE_KEYS,
        paths: &["rule-set"],
        parses: |json| {
            serde_json::from_value::<crate::server::route::spec::RuleSpec>(json).map(drop).map_err(|e| e.to_string())
        },
    },
    TableKind {
        section: "upstream",
        flag: UPSTREAM_JSON_FLAG,
        keys: &crate::server::route::spec::UPSTREAM_KEYS,
        paths: &[],
        parses: |json| {
            serde_json::from_value::<crate::server::route::spec::UpstreamSpec>(json)
                .map(drop)
                .map_err(|e| e.to_string())
        },
    },
];

impl TableKind {
    /// The tables as `--FLAG={…}` arguments, in order. Keys are checked here (so a typo
    /// names its line); values when the rules are built, by name.
    fn arguments(&self, item: &Item, source: &Source) -> Result<Vec<String>, String> {
        let section = self.section;
        let tables = item.as_array_of_tables().ok_or_else(|| {
            source.error(item.span(), format!("`{section}` must be [[{section}]] tables (see docs/routing.md)"))
        })?;
        let folder = Path::new(source.name).parent().unwrap_or(Path::new(""));
        let mut out = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let mut fields = serde_json::Map::new();
            for (key, value) in table.iter() {
                let line = key_span(table, key).or_else(|| table.span());
                if !self.keys.contains(&key) {
                    let hint = did_you_mean(key, self.keys.iter().copied())
                        .map(|near| format!("; did you mean `{near}`?"))
                        .unwrap_or_default();
                    let known = self.keys.join(", ");
                    let why = format!("unknown key `{key}` in [[{section}]] #{} ({known}){hint}", i + 1);
                    return Err(source.error(line, why));
                }
                let mut json = json_value(value).map_err(|why| source.error(line.clone(), format!("{key}: {why}")))?;
                if self.paths.contains(&key) {
                    json = relative_to(json, folder);
                }
                fields.insert(key.to_string(), json);
            }
            let json = serde_json::Value::Object(fields);
            (self.parses)(json.clone())
                .map_err(|why| source.error(table.span(), format!("[[{section}]] #{}: {why}", i + 1)))?;
            out.push(format!("--{}={json}", self.flag));
        }
        Ok(out)
    }
}

/// A TOML value (a string, integer, boolean or a list of them) as JSON.
fn json_value(item: &Item) -> Result<serde_json::Value, String> {
    fn one(value: &Value) -> Result<serde_json::Value, String> {
        Ok(match value {
            Value::String(s) => s.value().as_str().into(),
            Value::Integer(i) => (*i.value()).into(),
            Value::Boolean(b) => (*b.value()).into(),
            Value::Array(list) => serde_json::Value::Array(list.iter().map(one).collect::<Result<_, _>>()?),
            _ => return Err("expected a string, an integer, a boolean or a list of them".into()),
        })
    }
    one(item.as_value().ok_or("expected a value, not a table")?)
}

/// Rule-set paths (a string or a list) joined to `folder` where relative.
fn relative_to(json: serde_json::Value, folder: &Path) -> serde_json::Value {
    let join = |path: &str| serde_json::Value::from(folder.join(path).display().to_string());
    match json {
        serde_json::Value::String(path) => join(&path),
        serde_json::Value::Array(list) => {
            list.into_iter().map(|v| v.as_str().map(join).unwrap_or(v)).collect::<Vec<_>>().into()
        }
        other => other,
    }
}

/// The known key an unknown one was probably meant as: the same with dashes for
/// underscores (sing-box and Xray spell keys `max_sessions`), or one a typo or two away.
fn did_you_mean<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let dashed = key.replace('_', "-").to_lowercase();
    let scored = known.map(|name| (edit_distance(&dashed, name), name));
    let (distance, name) = scored.min()?;
    (distance <= 2.max(dashed.len() / 5)).then_some(name)
}

/// Levenshtein distance over chars (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

fn key_span(table: &Table, key: &str) -> Option<Range<usize>> {
    table.key(key).and_then(|k| k.span())
}

/// One value as text, with its place in the file.
type Placed = (String, Option<Range<usize>>);

/// A key's values as text, each with its place in the file.
fn item_values(item: &Item) -> Result<Vec<Placed>, String> {
    match item {
        Item::Value(Value::Array(list)) => list.iter().map(|value| Ok((scalar(value)?, value.span()))).collect(),
        Item::Value(value) => Ok(vec![(scalar(value)?, value.span())]),
        _ => Err("expected a value or a list of values".into()),
    }
}

fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(i) => Ok(i.value().to_string()),
        Value::Float(f) => Ok(f.value().to_string()),
        Value::Boolean(b) => Ok(b.value().to_string()),
        _ => Err("expected a string, number or boolean".into()),
    }
}

fn find_long<'a>(command: &'a Command, long: &str) -> Option<&'a Arg> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long) || arg.get_all_aliases().is_some_and(|a| a.contains(&long)))
}

/// Ids of the flags set on the command line or by their environment variable.
fn set_outside_the_file(argv: &[String], command: &Command) -> HashSet<String> {
    let mut given = HashSet::new();
    for arg in command.get_arguments() {
        if arg.get_env().is_some_and(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty())) {
            given.insert(arg.get_id().to_string());
        }
    }
    let mut tokens = argv.iter().skip(1);
    while let Some(token) = tokens.next() {
        if token == "--" {
            break;
        }
        let found = if let Some(long) = token.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or_default();
            find_long(command, name).map(|arg| (arg, !long.contains('=')))
        } else if let Some(short) = token.strip_prefix('-').and_then(|s| s.chars().next()) {
            command.get_arguments().find(|arg| arg.get_short() == Some(short)).map(|arg| (arg, token.len() == 2))
        } else {
            None
        };
        if let Some((arg, value_follows)) = found {
            given.insert(arg.get_id().to_string());
            if value_follows && arg.get_action().takes_values() {
                tokens.next();
            }
        }
    }
    given
}

/// A secret read from a file (`--password-file`): its lines, without line ends, blank
/// lines skipped. Refuses an empty file rather than start with no password.
pub fn read_secret_lines(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let lines: Vec<String> =
        text.lines().map(|line| line.trim_end_matches('\r').to_string()).filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(format!("{}: no password in the file", path.display()));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(short = 'l', long, default_value = "0.0.0.0:1")]
        listen: String,
        #[arg(short = 'p', long = "password", env = "ANYTLS_CONFIG_TEST_UNSET")]
        passwords: Vec<String>,
        #[arg(long)]
        user: Vec<String>,
        #[arg(long, default_value_t = 7)]
        max_sessions: usize,
        #[arg(long)]
        insecure: bool,
        #[arg(long, conflicts_with = "passwords")]
        password_file: Option<PathBuf>,
    }

    fn parse(file: &str, cli: &[&str]) -> Result<Args, String> {
        let command = Args::command();
        let mut argv: Vec<String> = vec!["x".into()];
        argv.extend(cli.iter().map(|s| s.to_string()));
        let from_file = config_arguments(file, "x.toml", &command)?;
        Args::try_parse_from(merge(argv, from_file, &command)).map_err(|e| e.to_string())
    }

    const FILE: &str = r#"
listen = "127.0.0.1:9"
password = ["a", "b"]
max-sessions = 3
insecure = true
[[users]]
name = "alice"
password = "pw:with:colons"
"#;

    #[test]
    fn every_key_becomes_its_flag() {
        let args = parse(FILE, &[]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:9");
        assert_eq!(args.passwords, ["a", "b"]);
        assert_eq!(args.max_sessions, 3);
        assert!(args.insecure);
        assert_eq!(args.user, ["alice:pw:with:colons"]);
    }

    #[test]
    fn the_command_line_wins_and_replaces_lists() {
        let args = parse(FILE, &["-l", "127.0.0.1:10", "--password=c", "--max-sessions", "5"]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:10");
        assert_eq!(args.passwords, ["c"]);
        assert_eq!(args.max_sessions, 5);
        let args = parse(FILE, &["-pd"]).unwrap();
        assert_eq!(args.passwords, ["d"]);
    }

    #[test]
    fn a_flag_on_the_command_line_also_overrides_the_files_conflicting_ones() {
        let file = "password-file = \"/x\"\n";
        let args = parse(file, &["-p", "cli"]).unwrap();
        assert_eq!((args.passwords, args.password_file), (vec!["cli".to_string()], None));
        let args = parse("password = \"file\"\n", &["--password-file", "/y"]).unwrap();
        assert_eq!((args.passwords.len(), args.password_file), (0, Some(PathBuf::from("/y"))));
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse("lisen = \"x\"", &[]).unwrap_err();
        assert!(err.contains("unknown key `lisen`"), "{err}");
        let err = parse("listen = [\"a\", \"b\"]", &[]).unwrap_err();
        assert!(err.contains("one value"), "{err}");
        let err = parse("listen = ", &[]).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        let err = parse("[[users]]\nname = \"x\"", &[]).unwrap_err();
        assert!(err.contains("needs `name` and `password`"), "{err}");
        let err = parse("config = \"x\"", &[]).unwrap_err();
        assert!(err.contains("cannot be set inside"), "{err}");
    }

    #[test]
    fn a_user_name_with_a_colon_is_refused_not_split() {
        let err = parse("[[users]]\nname = \"a:b\"\npassword = \"pw\"", &[]).unwrap_err();
        assert!(err.contains("[[users]] #1") && err.contains("\"a:b\"") && err.contains("`:`"), "{err}");
        let err = parse("[[users]]\nname = \"a\"\npassword = \"p\"\n[[users]]\nname = \"\"\npassword = \"q\"", &[])
            .unwrap_err();
        assert!(err.contains("[[users]] #2"), "{err}");
        let err = parse("[[users]]\nname = \"a\"\npassword = \"\"", &[]).unwrap_err();
        assert!(err.contains("password is empty"), "{err}");
    }

    #[test]
    fn a_bad_value_names_the_file_the_line_and_the_key() {
        let err = parse("listen = \"a\"\n\nmax-sessions = \"many\"\n", &[]).unwrap_err();
        assert_eq!(err, "x.toml:3: max-sessions: invalid value \"many\": invalid digit found in string");
    }

    #[test]
    fn a_bad_value_in_a_list_names_the_line_of_the_element() {
        #[derive(Parser, Debug)]
        struct Numbers {
            #[arg(long)]
            port: Vec<u16>,
        }
        let err = config_arguments("port = [\n  1,\n  70000,\n]\n", "n.toml", &Numbers::command()).unwrap_err();
        assert!(err.starts_with("n.toml:3: port: invalid value \"70000\": "), "{err}");
    }

    #[test]
    fn a_value_outside_the_possible_ones_lists_them() {
        #[derive(Parser, Debug)]
        struct Choice {
            #[arg(long, value_parser = ["red", "green"])]
            colour: String,
        }
        let err = config_arguments("\ncolour = \"blue\"", "c.toml", &Choice::command()).unwrap_err();
        assert_eq!(err, "c.toml:2: colour: invalid value \"blue\" (possible values: red, green)");
    }

    #[test]
    fn an_unknown_key_names_the_file_the_line_and_the_key() {
        let err = parse("listen = \"a\"\nlisen = \"x\"", &[]).unwrap_err();
        assert_eq!(
            err,
            "x.toml:2: unknown key `lisen` (keys are the long flag names of --help); did you mean `listen`?"
        );
        let err = parse("[[users]]\nname = \"a\"\npassword = \"p\"\nrole = \"admin\"", &[]).unwrap_err();
        assert!(err.starts_with("x.toml:4: unknown key `role` in [[users]]"), "{err}");
    }

    #[test]
    fn underscores_and_typos_get_a_hint_and_far_off_keys_none() {
        assert_eq!(did_you_mean("max_sessions", ["max-sessions", "max-streams"].into_iter()), Some("max-sessions"));
        assert_eq!(did_you_mean("quota_bytes", PLAN_KEYS.into_iter()), Some("quota-bytes"));
        assert_eq!(did_you_mean("Listen", ["listen"].into_iter()), Some("listen"));
        assert_eq!(did_you_mean("certificate_path", ["cert", "key"].into_iter()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_hidden_flag_is_not_a_key() {
        #[derive(Parser, Debug)]
        struct Hidden {
            #[arg(long, hide = true)]
            secret_switch: bool,
        }
        let err = config_arguments("secret-switch = true", "h.toml", &Hidden::command()).unwrap_err();
        assert!(err.starts_with("h.toml:1: unknown key `secret-switch`"), "{err}");
    }

    #[test]
    fn a_users_plan_is_carried_and_its_mistakes_name_their_line() {
        #[derive(Parser, Debug)]
        struct WithPlans {
            #[arg(long)]
            user: Vec<String>,
            #[arg(long = "user-json", hide = true)]
            user_json: Vec<String>,
        }
        let command = WithPlans::command();
        let file = "[[users]]\nname = \"a\"\npassword = \"p\"\nquota-bytes = 1000\nexpires = 2030-01-02T03:04:05Z\n";
        let args = config_arguments(file, "u.toml", &command).unwrap();
        let json: serde_json::Value = serde_json::from_str(args[0].1.strip_prefix("--user-json=").unwrap()).unwrap();
        assert_eq!(json["plan"]["quota-bytes"], 1000);
        assert_eq!(json["plan"]["expires"], "2030-01-02T03:04:05Z");
        let err = config_arguments("[[users]]\nname = \"a\"\npassword = \"p\"\n\nspeed-up = -5\n", "u.toml", &command)
            .unwrap_err();
        assert!(err.starts_with("u.toml:5: [[users]] #1 (a): speed-up: invalid value: integer `-5`"), "{err}");
        let err =
            config_arguments("[[users]]\nname = \"a\"\npassword = \"p\"\nexpires = \"soon\"\n", "u.toml", &command)
                .unwrap_err();
        assert!(err.starts_with("u.toml:4: [[users]] #1 (a): expires: "), "{err}");
        let err =
            config_arguments("[[users]]\nname = \"a\"\npassword = \"p\"\nspeed = 1\n", "u.toml", &command).unwrap_err();
        assert!(err.contains("unknown key `speed` in [[users]] (name, password, quota-bytes"), "{err}");
    }

    #[test]
    fn a_users_mistake_names_its_line() {
        let err = parse("listen = \"a\"\n[[users]]\nname = \"a:b\"\npassword = \"pw\"", &[]).unwrap_err();
        assert!(err.starts_with("x.toml:3: [[users]] #1: name \"a:b\""), "{err}");
        let err = parse("[[users]]\nname = \"a\"\npassword = \"\"", &[]).unwrap_err();
        assert!(err.starts_with("x.toml:3: [[users]] #1 (a): the password is empty"), "{err}");
        let err = parse("listen = \"a\"\n\n[[users]]\nname = \"x\"", &[]).unwrap_err();
        assert!(err.starts_with("x.toml:3: each [[users]] needs"), "{err}");
    }

    #[test]
    fn rules_between_flags_are_checked_on_the_merged_command_line() {
        let err = parse("password-file = \"/x\"\npassword = \"y\"", &[]).unwrap_err();
        assert!(err.contains("cannot be used with"), "{err}");
    }

    #[test]
    fn the_config_path_is_found_in_both_forms() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(config_path(&argv(&["x", "--config", "a.toml"])), Some(PathBuf::from("a.toml")));
        assert_eq!(config_path(&argv(&["x", "-l", "y", "--config=b.toml"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_path(&argv(&["x", "--", "--config=b.toml"])), None);
    }
}
