//! `--config FILE`: a TOML file whose top-level keys are the binary's long flag names
//! (`listen = "0.0.0.0:8443"`, `max-sessions = 4096`, `deny = ["10.0.0.0/8"]`).
//!
//! The file is turned into command-line arguments placed before the real ones, and clap
//! parses the lot. So every flag, including ones added later, is a config key with the
//! same checks and defaults, and the command line wins: a flag given on the command line
//! (or through its environment variable, such as `ANYTLS_PASSWORD`) makes the file's value
//! for it ignored, for repeatable flags too (the file's list is replaced, not extended).
//!
//! The server's `[[users]]` tables (`name`, `password`) become `--user NAME:PASSWORD`.
//! These arguments live only in this process's memory: unlike real arguments they never
//! show in `/proc/PID/cmdline` or `ps`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};
use toml_edit::{DocumentMut, Item, Value};

/// The long name of the flag that names the file.
pub const CONFIG_FLAG: &str = "config";

/// `argv` with the arguments of its `--config FILE` (if any) inserted after the program
/// name, minus those the command line (or the environment) already sets.
pub fn command_line_with_config(argv: Vec<String>, command: &Command) -> Result<Vec<String>, String> {
    let Some(path) = config_path(&argv) else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--config: cannot read {}: {e}", path.display()))?;
    let from_file = config_arguments(&text, command).map_err(|e| format!("{}: {e}", path.display()))?;
    let given = set_outside_the_file(&argv, command);
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    let mut argv = argv.into_iter();
    out.extend(argv.next());
    out.extend(from_file.into_iter().filter(|(id, _)| !overridden(id, &given, command)).map(|(_, arg)| arg));
    out.extend(argv);
    Ok(out)
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

/// The file's keys as `(arg id, --long=value)` pairs, each key checked against `command`.
pub fn config_arguments(text: &str, command: &Command) -> Result<Vec<(String, String)>, String> {
    let document: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string().trim().to_string())?;
    let mut out = Vec::new();
    for (key, item) in document.iter() {
        if key == CONFIG_FLAG {
            return Err("`config` cannot be set inside a config file".into());
        }
        if key == "users" && find_long(command, "user").is_some() {
            let user = find_long(command, "user").expect("checked");
            for entry in users(item)? {
                out.push((user.get_id().to_string(), format!("--user={entry}")));
            }
            continue;
        }
        let Some(arg) = find_long(command, key) else {
            return Err(format!("unknown key `{key}` (keys are the long flag names of --help)"));
        };
        let id = arg.get_id().to_string();
        let values = item_values(key, item)?;
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match values.as_slice() {
                [flag] if flag == "true" => out.push((id, format!("--{key}"))),
                [flag] if flag == "false" => {}
                _ => return Err(format!("`{key}` is a switch: true or false")),
            }
            continue;
        }
        if values.len() > 1 && !matches!(arg.get_action(), ArgAction::Append) {
            return Err(format!("`{key}` takes one value, not a list"));
        }
        out.extend(values.into_iter().map(|value| (id.clone(), format!("--{key}={value}"))));
    }
    Ok(out)
}

/// `[[users]]` tables as `NAME:PASSWORD` strings.
fn users(item: &Item) -> Result<Vec<String>, String> {
    let tables = item.as_array_of_tables().ok_or("`users` must be [[users]] tables with name and password")?;
    let mut out = Vec::new();
    for (i, table) in tables.iter().enumerate() {
        let field = |name: &str| table.get(name).and_then(Item::as_str).map(str::to_string);
        let (Some(name), Some(password)) = (field("name"), field("password")) else {
            return Err("each [[users]] needs `name` and `password` (strings)".into());
        };
        // A colon would move into the password on the way through `--user NAME:PASSWORD`,
        // and the user would be refused the password they were given.
        if name.is_empty() || name.contains(':') {
            return Err(format!(
                "[[users]] #{}: name {name:?} cannot be empty or contain `:` (the password may)",
                i + 1
            ));
        }
        if password.is_empty() {
            return Err(format!("[[users]] #{} ({name}): the password is empty", i + 1));
        }
        if let Some(other) = table.iter().map(|(k, _)| k).find(|k| *k != "name" && *k != "password") {
            return Err(format!("unknown key `{other}` in [[users]] (name, password)"));
        }
        out.push(format!("{name}:{password}"));
    }
    Ok(out)
}

fn item_values(key: &str, item: &Item) -> Result<Vec<String>, String> {
    match item {
        Item::Value(Value::Array(list)) => list.iter().map(|value| scalar(key, value)).collect(),
        Item::Value(value) => Ok(vec![scalar(key, value)?]),
        _ => Err(format!("`{key}`: expected a value or a list of values")),
    }
}

fn scalar(key: &str, value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(i) => Ok(i.value().to_string()),
        Value::Float(f) => Ok(f.value().to_string()),
        Value::Boolean(b) => Ok(b.value().to_string()),
        _ => Err(format!("`{key}`: expected a string, number or boolean")),
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
        let from_file = config_arguments(file, &command)?;
        let given = set_outside_the_file(&argv, &command);
        let mut all = vec![argv[0].clone()];
        all.extend(from_file.into_iter().filter(|(id, _)| !overridden(id, &given, &command)).map(|(_, a)| a));
        all.extend(argv.into_iter().skip(1));
        Args::try_parse_from(all).map_err(|e| e.to_string())
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
    fn the_config_path_is_found_in_both_forms() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(config_path(&argv(&["x", "--config", "a.toml"])), Some(PathBuf::from("a.toml")));
        assert_eq!(config_path(&argv(&["x", "-l", "y", "--config=b.toml"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_path(&argv(&["x", "--", "--config=b.toml"])), None);
    }
}
