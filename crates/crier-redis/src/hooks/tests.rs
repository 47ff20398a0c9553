//! Unit tests of the stream entry parsing and event-id mapping (`super`).
use super::*;

fn bs(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

#[test]
fn stream_entries_become_events_and_strangers_are_set_aside() {
    let ok = r#"{"name":"member_added","channel":"c","time_ms":1765000000000,"user":"u","client":"k"}"#;
    let list = Value::Array(vec![
        Value::Array(vec![bs("1-0"), Value::Array(vec![bs("e"), bs(ok)])]),
        Value::Array(vec![bs("1-1"), Value::Array(vec![bs("x"), bs("y")])]),
        Value::Array(vec![bs("1-2"), Value::Array(vec![bs("e"), bs("not json")])]),
    ]);
    let (events, bad, aliases) = entries(&list);
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (e.id.as_str(), e.name.as_str(), e.channel.as_str(), e.time_ms),
        ("1-0", "member_added", "c", 1_765_000_000_000)
    );
    assert_eq!((e.user.as_deref(), e.client.as_deref(), e.data.as_ref()), (Some("u"), Some("k"), None));
    assert_eq!(bad, ["1-1", "1-2"]);
    assert!(aliases.is_empty());
    assert_eq!(entries(&Value::Nil), (Vec::new(), Vec::new(), Vec::new()));
    // Made on a Cluster: the event's own id, mapped to its entry for the acknowledgement.
    let own = r#"{"id":"inst:7-1","name":"channel_occupied","channel":"c","time_ms":1765000000000}"#;
    let list = Value::Array(vec![Value::Array(vec![bs("2-0"), Value::Array(vec![bs("e"), bs(own)])])]);
    let (events, _, aliases) = entries(&list);
    assert_eq!(events[0].id, "inst:7-1");
    assert_eq!(aliases, [("inst:7-1".to_owned(), "2-0".to_owned())]);
}

#[test]
fn events_map_to_their_stream_entries() {
    let mut map = HashMap::new();
    map.insert("i:1-1".to_owned(), vec!["5-0".to_owned(), "6-0".to_owned()]);
    map.insert("i:1-2".to_owned(), vec!["5-1".to_owned()]);
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // A hold keeps the map; an event moved twice (and so read twice) is both its entries.
    assert_eq!(entries_of(&mut map, &ids(&["i:1-1", "i:1-1", "i:1-2"]), false), ["5-0", "5-1", "6-0"]);
    // Stream ids stand for themselves; an unknown own id is skipped, never sent to XACK.
    assert_eq!(entries_of(&mut map, &ids(&["7-3", "other:9-1"]), true), ["7-3"]);
    assert_eq!(entries_of(&mut map, &ids(&["i:1-1", "i:1-1"]), true), ["5-0", "6-0"]);
    assert_eq!(map.len(), 1, "acknowledged, forgotten");
    assert!(is_stream_id("1765000000000-0") && !is_stream_id("i:1-1") && !is_stream_id("-1") && !is_stream_id("1-"));
}

#[test]
fn consumer_entries_in_resp2_and_resp3() {
    let resp2 = Value::Array(vec![
        bs("name"),
        bs("node-a"),
        bs("pending"),
        Value::Int(0),
        bs("idle"),
        Value::Int(90_000),
        bs("inactive"),
        Value::Int(90_000),
    ]);
    assert_eq!(consumer_info(&resp2), Some(("node-a".into(), 0, 90_000)));
    let resp3 = Value::Map(vec![
        (Value::SimpleString("name".into()), bs("node-b")),
        (Value::SimpleString("pending".into()), Value::Int(3)),
        (Value::SimpleString("idle".into()), Value::Int(5)),
    ]);
    assert_eq!(consumer_info(&resp3), Some(("node-b".into(), 3, 5)));
    assert_eq!(consumer_info(&Value::Array(vec![bs("name"), bs("x")])), None);
}
