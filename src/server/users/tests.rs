use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

fn entry(name: &str, password: &str) -> UserEntry {
    UserEntry::new(name, password, Plan::default())
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

/// The user whose password is `password`, seated from 127.0.0.2, as authentication does.
fn admit(users: &Users, password: &str) -> Result<(Arc<User>, Seat), Option<Refusal>> {
    users.admit(PasswordHash::of(password).as_bytes(), ip(2), now())
}

const QUICK: Duration = Duration::from_millis(100);

#[test]
fn users_parse_from_name_colon_password() {
    let user = UserEntry::parse("alice:pw:x").unwrap();
    assert_eq!((user.name.as_str(), user.hash), ("alice", PasswordHash::of("pw:x")));
    assert!(UserEntry::parse("alice").is_err());
    assert!(UserEntry::parse(":pw").is_err());
    assert!(UserEntry::parse("alice:").is_err());
}

#[test]
fn a_password_authenticates_its_user_among_a_hundred_thousand() {
    let entries: Vec<UserEntry> = (0..100_000).map(|i| entry(&format!("u{i}"), &format!("pw{i}"))).collect();
    let users = Users::new(entries).unwrap();
    assert_eq!(admit(&users, "pw99999").expect("found").0.name, "u99999");
    assert_eq!(admit(&users, "pw0").expect("found").0.name, "u0");
    assert_eq!(admit(&users, "x").unwrap_err(), None, "a wrong password is no refusal");
}

#[tokio::test]
async fn a_reload_keeps_unchanged_users_and_cuts_the_others() {
    let users = Users::new(vec![entry("alice", "a"), entry("bob", "b"), entry("carol", "c")]).unwrap();
    let [mut alice, mut bob, mut carol] = ["a", "b", "c"].map(|password| admit(&users, password).unwrap());
    alice.0.counters.streams.fetch_add(3, Ordering::Relaxed);
    let summary = users.replace(vec![entry("alice", "a"), entry("carol", "c2"), entry("dave", "d")]).unwrap();
    assert_eq!(
        summary,
        ReloadSummary { added: vec!["dave".into()], removed: vec!["bob".into()], kept: 1, left_alone: 0 }
    );
    assert_eq!(tokio::time::timeout(QUICK, bob.1.cut()).await, Ok(Cut::Removed));
    assert_eq!(tokio::time::timeout(QUICK, carol.1.cut()).await, Ok(Cut::PasswordChanged));
    assert!(tokio::time::timeout(QUICK, alice.1.cut()).await.is_err(), "alice stays");
    assert!(admit(&users, "b").is_err());
    assert!(admit(&users, "c").is_err());
    assert_eq!(admit(&users, "c2").unwrap().0.name, "carol");
    let report = users.report();
    let alice = report.iter().find(|r| r.user == "alice").unwrap();
    assert_eq!((alice.active, alice.streams), (true, 3));
    assert!(!report.iter().find(|r| r.user == "bob").unwrap().active);
}

#[test]
fn two_users_swapping_passwords_in_a_reload_both_work() {
    let users = Users::new(vec![entry("a", "1"), entry("b", "2")]).unwrap();
    users.replace(vec![entry("a", "2"), entry("b", "1")]).unwrap();
    assert_eq!(admit(&users, "1").unwrap().0.name, "b");
    assert_eq!(admit(&users, "2").unwrap().0.name, "a");
}

#[test]
fn broken_user_lists_are_refused_and_change_nothing() {
    assert_eq!(Users::new(vec![]).unwrap_err(), UsersError::None);
    assert!(UsersError::None.to_string().starts_with("no users"));
    let users = Users::new(vec![entry("alice", "a")]).unwrap();
    let twice = users.replace(vec![entry("x", "1"), entry("x", "2")]).unwrap_err();
    assert_eq!(twice.to_string(), "user \"x\" is given twice");
    let same = users.replace(vec![entry("x", "1"), entry("y", "1")]).unwrap_err();
    assert_eq!(same.to_string(), "users \"x\" and \"y\" have the same password");
    assert_eq!(users.names(), ["alice"]);
}

#[tokio::test]
async fn api_changes_touch_only_their_user_and_survive_a_reload() {
    let users = Users::new(vec![entry("alice", "a"), entry("bob", "b")]).unwrap();
    let (_, mut alice_seat) = admit(&users, "a").unwrap();
    users.add(entry("carol", "c")).unwrap();
    assert_eq!(users.add(entry("carol", "c9")).unwrap_err(), UsersError::NameTaken("carol".into()));
    assert_eq!(users.add(entry("dave", "a")).unwrap_err(), UsersError::SamePassword("alice".into(), "dave".into()));
    let change = PlanChange { speed_up: Some(Some(1000)), ..PlanChange::default() };
    let bob = users.updated("bob", None, &change).unwrap();
    users.update(bob).unwrap();
    assert_eq!(users.get("bob").unwrap().speed_up.rate(), Some(1000));
    assert!(tokio::time::timeout(QUICK, alice_seat.cut()).await.is_err(), "alice untouched");
    users.remove("alice").unwrap();
    assert_eq!(alice_seat.cut().await, Cut::Removed);
    // The file still has alice and bob as they were: the API's changes stand.
    let summary = users.replace(vec![entry("alice", "a"), entry("bob", "b")]).unwrap();
    assert_eq!(summary.left_alone, 2, "bob changed and carol added by the API");
    assert!(users.get("alice").is_none(), "removed by the API, not brought back");
    assert_eq!(users.get("bob").unwrap().speed_up.rate(), Some(1000));
    assert!(users.get("carol").is_some());
    // Adding her again through the API makes her the API's.
    users.add(entry("alice", "a2")).unwrap();
    assert_eq!(users.replace(vec![entry("bob", "b")]).unwrap().removed, Vec::<String>::new());
    assert!(users.get("alice").is_some());
}

#[tokio::test]
async fn disabling_expiring_and_the_quota_cut_sessions_and_refuse_new_ones() {
    let users = Users::new(vec![entry("alice", "a"), entry("bob", "b")]).unwrap();
    let (_, mut bob_seat) = admit(&users, "b").unwrap();

    let (alice, mut seat) = admit(&users, "a").unwrap();
    let off = users.updated("alice", None, &PlanChange { enabled: Some(false), ..Default::default() }).unwrap();
    users.update(off).unwrap();
    assert_eq!(seat.cut().await, Cut::Disabled);
    assert_eq!(admit(&users, "a").unwrap_err(), Some(Refusal::Disabled));
    drop((alice, seat));

    let on = PlanChange { enabled: Some(true), quota_bytes: Some(Some(1000)), ..Default::default() };
    users.update(users.updated("alice", None, &on).unwrap()).unwrap();
    let (alice, mut seat) = admit(&users, "a").unwrap();
    alice.charge(999);
    assert!(tokio::time::timeout(QUICK, seat.cut()).await.is_err(), "under the quota");
    alice.charge(1);
    assert_eq!(seat.cut().await, Cut::Quota);
    assert_eq!(admit(&users, "a").unwrap_err(), Some(Refusal::Quota));
    drop(seat);

    let past = now() - jiff::SignedDuration::from_secs(1);
    let change = PlanChange { quota_bytes: Some(None), expires: Some(Some(past)), ..Default::default() };
    users.update(users.updated("alice", None, &change).unwrap()).unwrap();
    assert_eq!(admit(&users, "a").unwrap_err(), Some(Refusal::Expired));
    assert_eq!(users.refused(Refusal::Expired), 1);
    assert_eq!(alice.refused(Refusal::Quota), 1);

    assert!(tokio::time::timeout(QUICK, bob_seat.cut()).await.is_err(), "bob untouched by all of it");
}

#[tokio::test]
async fn expiry_closes_open_sessions_when_its_time_comes() {
    let users = Users::new(vec![entry("alice", "a")]).unwrap();
    let soon = now() + jiff::SignedDuration::from_millis(200);
    let change = PlanChange { expires: Some(Some(soon)), ..Default::default() };
    users.update(users.updated("alice", None, &change).unwrap()).unwrap();
    let (_, mut seat) = admit(&users, "a").unwrap();
    assert_eq!(users.expire(now()), 0, "not yet");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(users.expire(now()), 1);
    assert_eq!(seat.cut().await, Cut::Expired);
}

#[test]
fn the_device_and_session_limits_apply_at_authentication() {
    let plan = Plan { max_ips: Some(1), max_sessions: Some(2), ..Plan::default() };
    let users = Users::new(vec![UserEntry::new("alice", "a", plan)]).unwrap();
    let hash = PasswordHash::of("a");
    let _one = users.admit(hash.as_bytes(), ip(2), now()).unwrap();
    assert_eq!(users.admit(hash.as_bytes(), ip(3), now()).unwrap_err(), Some(Refusal::Ips));
    let _two = users.admit(hash.as_bytes(), ip(2), now()).unwrap();
    assert_eq!(users.admit(hash.as_bytes(), ip(2), now()).unwrap_err(), Some(Refusal::Sessions));
}

#[test]
fn stats_clear_without_moving_the_counters_metrics_read() {
    let users = Users::new(vec![entry("alice", "a")]).unwrap();
    let alice = users.get("alice").unwrap();
    alice.counters.bytes_up.fetch_add(10, Ordering::Relaxed);
    assert_eq!(alice.usage(true).bytes_up, 10);
    alice.counters.bytes_up.fetch_add(5, Ordering::Relaxed);
    assert_eq!(alice.usage(false).bytes_up, 5, "since the clear");
    assert_eq!(users.report()[0].bytes_up, 15, "never backwards for /metrics");
}

#[test]
fn pages_follow_names_and_restore_brings_back_the_apis_state() {
    let users = Users::managed(vec![]).unwrap();
    for name in ["c", "a", "b", "d"] {
        users.add(entry(name, &format!("pw-{name}"))).unwrap();
    }
    let names = |page: Vec<Arc<User>>| page.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(users.page(None, 3)), ["a", "b", "c"]);
    assert_eq!(names(users.page(Some("c"), 3)), ["d"]);

    let restored = Users::new(vec![entry("a", "old"), entry("gone", "g")]).unwrap();
    restored.restore(vec![entry("a", "pw-a")], vec!["gone".into()], vec![("a".into(), 77)]);
    assert_eq!(restored.names(), ["a"]);
    assert_eq!(restored.get("a").unwrap().view().used_bytes, 77);
    assert!(restored.admit(PasswordHash::of("pw-a").as_bytes(), ip(2), now()).is_ok());
    assert!(restored.admit(PasswordHash::of("old").as_bytes(), ip(2), now()).is_err());
}

#[test]
fn names_are_plain() {
    for bad in ["", "a:b", "a/b", "a\nb", &"x".repeat(129)] {
        assert_eq!(check_name(bad), Err(UsersError::BadName), "{bad:?}");
    }
    assert_eq!(check_name("alice@example.com"), Ok(()));
}
