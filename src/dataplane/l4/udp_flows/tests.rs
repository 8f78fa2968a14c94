use super::*;

fn client(port: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], port))
}

const IDLE: Duration = Duration::from_secs(30);

#[test]
fn insert_get_remove() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(4);
    assert!(table.is_empty());
    assert_eq!(table.insert(client(1), "a", t0), Ok(None));
    assert_eq!(table.insert(client(2), "b", t0), Ok(None));
    assert_eq!(table.len(), 2);
    assert_eq!(table.get(&client(1)), Some(&"a"));
    assert_eq!(table.get(&client(3)), None);
    *table.get_mut(&client(2)).unwrap() = "b2";
    assert_eq!(table.remove(&client(2)), Some("b2"));
    assert_eq!(table.remove(&client(2)), None);
    assert_eq!(table.len(), 1);
    // The same address on another port is another flow.
    assert_eq!(table.insert(client(2), "c", t0), Ok(None));
    let mut keys: Vec<_> = table.iter().map(|(k, _)| k.port()).collect();
    keys.sort();
    assert_eq!(keys, [1, 2]);
}

#[test]
fn cap_refuses_new_flows_and_returns_the_value() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(2);
    assert_eq!(table.max_flows(), 2);
    table.insert(client(1), 1, t0).unwrap();
    table.insert(client(2), 2, t0).unwrap();
    let refused = table.insert(client(3), 3, t0).unwrap_err();
    assert_eq!(refused, FlowTableFull(3));
    assert!(refused.to_string().contains("dropped"));
    assert_eq!(table.len(), 2);
    assert_eq!(table.get(&client(3)), None);

    // Replacing an existing flow is allowed at the cap.
    assert_eq!(table.insert(client(2), 22, t0), Ok(Some(2)));
    // Room again once one leaves.
    table.remove(&client(1));
    assert_eq!(table.insert(client(3), 3, t0), Ok(None));

    let mut none = FlowTable::new(0);
    assert_eq!(none.insert(client(1), (), t0), Err(FlowTableFull(())));
}

#[test]
fn expire_removes_only_idle_flows() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(10);
    table.insert(client(1), "quiet", t0).unwrap();
    table.insert(client(2), "busy", t0).unwrap();
    table
        .insert(client(3), "late", t0 + Duration::from_secs(20))
        .unwrap();

    // Activity in either direction keeps a flow alive.
    assert_eq!(
        table.touch(&client(2), t0 + Duration::from_secs(25)),
        Some(&mut "busy")
    );
    assert_eq!(table.touch(&client(9), t0), None);
    assert_eq!(
        table.last_active(&client(2)),
        Some(t0 + Duration::from_secs(25))
    );

    assert!(table.expire(t0 + Duration::from_secs(29), IDLE).is_empty());

    let expired = table.expire(t0 + IDLE, IDLE);
    assert_eq!(expired, vec![(client(1), "quiet")]);
    assert_eq!(table.len(), 2);

    let mut expired = table.expire(t0 + Duration::from_secs(60), IDLE);
    expired.sort();
    assert_eq!(expired, vec![(client(2), "busy"), (client(3), "late")]);
    assert!(table.is_empty());
}

#[test]
fn stale_clock_readings_never_move_activity_back() {
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(10);
    let mut table = FlowTable::new(1);
    table.insert(client(1), (), later).unwrap();
    table.touch(&client(1), t0);
    table.insert(client(1), (), t0).unwrap();
    assert_eq!(table.last_active(&client(1)), Some(later));
    // A `now` before the last activity is not idle time.
    let second = Duration::from_secs(1);
    assert!(table.expire(t0 + second, second).is_empty());
    assert_eq!(table.expire(later + second, second).len(), 1);
}

#[test]
fn retain_drops_flows_of_a_vanished_endpoint() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(10);
    let a: SocketAddr = "10.0.0.1:53".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:53".parse().unwrap();
    for port in 1..=6 {
        table
            .insert(client(port), if port % 2 == 0 { a } else { b }, t0)
            .unwrap();
    }
    table.retain(|_, endpoint| *endpoint != a);
    assert_eq!(table.len(), 3);
    assert!(table.iter().all(|(k, v)| *v == b && k.port() % 2 == 1));
}

#[test]
fn huge_idle_does_not_overflow() {
    let t0 = Instant::now();
    let mut table = FlowTable::new(1);
    table.insert(client(1), (), t0).unwrap();
    assert!(table.expire(t0 + IDLE, Duration::MAX).is_empty());
}
