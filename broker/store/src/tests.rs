//! The store's contract: what a completed ticket covers is there after reopening — also
//! after the process is killed with SIGKILL — and the ops of one commit fold correctly.

use super::*;

fn open(dir: &Path) -> (Store, Recovered) {
    Store::open(dir, Sync::Always, Duration::ZERO).expect("open")
}

fn enqueue(id: &str, seq: u64, body: &str) -> Op {
    Op::Enqueue {
        client_id: id.into(),
        seq,
        record: body.as_bytes().to_vec(),
    }
}

#[test]
fn what_a_ticket_covers_is_there_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (store, r) = open(dir.path());
    assert!(r.sessions.is_empty() && r.queued.is_empty());
    store
        .submit(vec![
            Op::PutSession {
                client_id: "dev-1".into(),
                record: b"s1".to_vec(),
            },
            enqueue("dev-1", 256, "b"),
            enqueue("dev-1", 2, "a"),
            Op::PutMark {
                client_id: "dev-1".into(),
                key: b"q2/7".to_vec(),
                record: vec![],
            },
            Op::PutRetained {
                topic: "a/b".into(),
                record: b"r".to_vec(),
            },
        ])
        .wait_blocking()
        .unwrap();
    store.close();
    let (store, r) = open(dir.path());
    assert_eq!(r.sessions, vec![("dev-1".to_string(), b"s1".to_vec())]);
    // Sequence order, not insertion or byte-string order of the decimal numbers.
    let seqs: Vec<u64> = r.queued.iter().map(|q| q.1).collect();
    assert_eq!(seqs, vec![2, 256]);
    assert_eq!(
        r.marks,
        vec![("dev-1".to_string(), b"q2/7".to_vec(), vec![])]
    );
    assert_eq!(r.retained, vec![("a/b".to_string(), b"r".to_vec())]);
    store.close();
}

#[test]
fn ops_in_one_commit_fold_into_each_keys_last_state() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store
        .submit(vec![
            enqueue("a", 1, "kept"),
            enqueue("ab", 1, "other session"),
        ])
        .wait_blocking()
        .unwrap();
    store
        .submit(vec![
            // Queued and acknowledged within one commit: never written.
            enqueue("a", 2, "gone"),
            Op::Dequeue {
                client_id: "a".into(),
                seq: 2,
            },
            // Set then cleared, cleared then set.
            Op::PutRetained {
                topic: "t/1".into(),
                record: b"x".to_vec(),
            },
            Op::DeleteRetained {
                topic: "t/1".into(),
            },
            Op::DeleteRetained {
                topic: "t/2".into(),
            },
            Op::PutRetained {
                topic: "t/2".into(),
                record: b"y".to_vec(),
            },
        ])
        .wait_blocking()
        .unwrap();
    store.close();
    let (store, r) = open(dir.path());
    let q: Vec<(String, u64)> = r.queued.iter().map(|q| (q.0.clone(), q.1)).collect();
    assert_eq!(q, vec![("a".into(), 1), ("ab".into(), 1)]);
    assert_eq!(r.retained, vec![("t/2".to_string(), b"y".to_vec())]);
    store.close();
}

#[test]
fn deleting_a_session_takes_its_queue_and_marks_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let session = |id: &str| Op::PutSession {
        client_id: id.into(),
        record: vec![1],
    };
    store
        .submit(vec![
            session("a"),
            session("ab"),
            enqueue("a", 1, "on disk"),
            enqueue("ab", 1, "neighbour"),
            Op::PutMark {
                client_id: "a".into(),
                key: b"q2/1".to_vec(),
                record: vec![],
            },
        ])
        .wait_blocking()
        .unwrap();
    // One commit: more for "a", then its deletion, then a new session under the same id.
    let t1 = store.submit(vec![enqueue("a", 2, "in this batch")]);
    let t2 = store.submit(vec![Op::DeleteSession {
        client_id: "a".into(),
    }]);
    let t3 = store.submit(vec![session("a"), enqueue("a", 9, "new life")]);
    for t in [t1, t2, t3] {
        t.wait_blocking().unwrap();
    }
    store.close();
    let (store, r) = open(dir.path());
    let q: Vec<(String, u64)> = r.queued.iter().map(|q| (q.0.clone(), q.1)).collect();
    assert_eq!(q, vec![("a".into(), 9), ("ab".into(), 1)]);
    assert!(r.marks.is_empty(), "{:?}", r.marks);
    assert_eq!(r.sessions.len(), 2);
    store.close();
}

#[test]
fn a_closed_store_refuses_work_instead_of_pretending() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let other = store.clone();
    store.close();
    assert!(other
        .submit(vec![enqueue("a", 1, "x")])
        .wait_blocking()
        .is_err());
}

/// Runs as a child process (see the test below): acknowledges each commit on stdout, forever.
#[test]
#[ignore = "run by what_was_acknowledged_survives_sigkill as a child process"]
fn child_writer() {
    use std::io::Write;
    let Ok(dir) = std::env::var("CORVID_STORE_CHILD_DIR") else {
        return;
    };
    let (store, _) = Store::open(Path::new(&dir), Sync::Always, Duration::ZERO).unwrap();
    let mut out = std::io::stdout();
    for seq in 0u64.. {
        store
            .submit(vec![enqueue("dev", seq, "payload")])
            .wait_blocking()
            .unwrap();
        writeln!(out, "acked {seq}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn what_was_acknowledged_survives_sigkill() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "tests::child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CORVID_STORE_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            last = Some(n.parse::<u64>().unwrap());
            if last >= Some(300) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "child acknowledged too little: {last:?}"
        );
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no final sync
    child.wait().unwrap();
    let last = last.expect("the child acknowledged something");
    let (store, r) = open(dir.path());
    let seqs: Vec<u64> = r.queued.iter().map(|q| q.1).collect();
    assert!(
        seqs.len() as u64 > last,
        "acknowledged up to {last}, recovered {}",
        seqs.len()
    );
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "a gap");
    store.close();
}

#[test]
fn marks_become_durable_in_order_and_a_closed_store_fails_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = store.send(vec![enqueue("c", 1, "x")]);
    let b = store.send(vec![enqueue("c", 2, "y")]);
    assert!(b > a && store.submitted() == b);
    rt.block_on(store.wait_durable(b)).expect("durable");
    assert!(store.durable() >= b && !store.failed());
    let clone = store.clone();
    store.close();
    let late = clone.send(vec![enqueue("c", 3, "z")]);
    assert!(rt.block_on(clone.wait_durable(late)).is_err());
    assert!(clone.failed());
    drop(clone);
    let (store, r) = open(dir.path());
    assert_eq!(r.queued.len(), 2, "what reached the durable mark is there");
    store.close();
}

#[test]
fn cluster_records_come_back_in_key_order_and_deletes_stick() {
    let dir = tempfile::tempdir().unwrap();
    let (store, r) = open(dir.path());
    assert!(r.cluster.is_empty());
    let put = |k: &[u8], v: &[u8]| Op::PutCluster {
        key: k.to_vec(),
        record: v.to_vec(),
    };
    store
        .submit(vec![
            put(b"out/b\x00\x02", b"two"),
            put(b"out/b\x00\x01", b"one"),
            put(b"in/a", b"old"),
            put(b"in/a", b"new"),
            put(b"out/b\x00\x03", b"three"),
            Op::DeleteCluster {
                key: b"out/b\x00\x03".to_vec(),
            },
        ])
        .wait_blocking()
        .unwrap();
    store
        .submit(vec![Op::DeleteCluster {
            key: b"out/b\x00\x01".to_vec(),
        }])
        .wait_blocking()
        .unwrap();
    store.close();
    let (store, r) = open(dir.path());
    assert_eq!(
        r.cluster,
        vec![
            (b"in/a".to_vec(), b"new".to_vec()),
            (b"out/b\x00\x02".to_vec(), b"two".to_vec()),
        ]
    );
    store.close();
}

/// With `Sync::Always`, a commit of relaxed changes alone (QoS 1 acknowledgements) is written
/// without `fdatasync`; the next commit that needs a sync has one, and a mixed commit is synced.
#[test]
fn relaxed_changes_alone_are_committed_without_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let syncs = || store.stats().syncs.load(Ordering::Relaxed);
    let commits = || store.stats().commits.load(Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    store
        .submit(vec![enqueue("dev-1", 1, "a"), enqueue("dev-1", 2, "b")])
        .wait_blocking()
        .unwrap();
    assert_eq!((commits(), syncs()), (1, 1));
    let mark = store.send_relaxed(vec![Op::Dequeue {
        client_id: "dev-1".into(),
        seq: 1,
    }]);
    rt.block_on(store.wait_durable(mark)).unwrap();
    assert_eq!(
        (commits(), syncs()),
        (2, 1),
        "a relaxed commit alone is not synced"
    );
    store
        .submit(vec![enqueue("dev-1", 3, "c")])
        .wait_blocking()
        .unwrap();
    assert_eq!(
        (commits(), syncs()),
        (3, 2),
        "the next commit that needs it syncs"
    );
    store.close();
    let (store, r) = open(dir.path());
    let seqs: Vec<u64> = r.queued.iter().map(|q| q.1).collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "the relaxed dequeue is there after reopening"
    );
    store.close();
}

fn dequeue(id: &str, seq: u64) -> Op {
    Op::Dequeue {
        client_id: id.into(),
        seq,
    }
}

/// Records in a keyspace of a closed store, read with the engine directly.
fn records(dir: &Path, keyspace: &str) -> usize {
    let db = Database::builder(dir).open().unwrap();
    let ks = db
        .keyspace(keyspace, KeyspaceCreateOptions::default)
        .unwrap();
    ks.iter().count()
}

fn seqs_of(r: &Recovered) -> Vec<(String, u64, String)> {
    r.queued
        .iter()
        .map(|(c, s, v)| (c.clone(), *s, String::from_utf8(v.clone()).unwrap()))
        .collect()
}

/// One commit's deliveries are one segment; those done with later — out of order, across
/// commits and sessions — stay done after reopening, and a segment with nothing live left is
/// deleted with its dead-set.
#[test]
fn deliveries_done_with_out_of_order_stay_done_and_empty_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store
        .submit((1..=5).map(|s| enqueue("a", s, &format!("a{s}"))).collect())
        .wait_blocking()
        .unwrap();
    store
        .submit(vec![enqueue("b", 1, "b1"), enqueue("a", 6, "a6")])
        .wait_blocking()
        .unwrap();
    store
        .submit(vec![dequeue("a", 4), dequeue("a", 2), dequeue("a", 6)])
        .wait_blocking()
        .unwrap();
    store.close();
    assert_eq!(records(dir.path(), "segments"), 2);
    let (store, r) = open(dir.path());
    let live = |v: &[(&str, u64)]| -> Vec<(String, u64, String)> {
        v.iter()
            .map(|(c, s)| (c.to_string(), *s, format!("{c}{s}")))
            .collect()
    };
    assert_eq!(seqs_of(&r), live(&[("a", 1), ("a", 3), ("a", 5), ("b", 1)]));
    // The first segment empties; the second still holds b1.
    store
        .submit(vec![dequeue("a", 1), dequeue("a", 3), dequeue("a", 5)])
        .wait_blocking()
        .unwrap();
    // Unknown and repeated ones change nothing.
    store
        .submit(vec![dequeue("a", 3), dequeue("zz", 1)])
        .wait_blocking()
        .unwrap();
    store.close();
    assert_eq!(records(dir.path(), "segments"), 1);
    assert_eq!(records(dir.path(), "segment_dead"), 1);
    let (store, r) = open(dir.path());
    assert_eq!(seqs_of(&r), live(&[("b", 1)]));
    store.submit(vec![dequeue("b", 1)]).wait_blocking().unwrap();
    store.close();
    assert_eq!(records(dir.path(), "segments"), 0);
    assert_eq!(records(dir.path(), "segment_dead"), 0);
}

/// Deleting a session kills its deliveries inside segments it shares with others, and a
/// number queued again replaces the first one.
#[test]
fn a_deleted_session_leaves_nothing_in_shared_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store
        .submit(vec![
            enqueue("a", 1, "a1"),
            enqueue("b", 1, "b1"),
            enqueue("a", 2, "a2"),
        ])
        .wait_blocking()
        .unwrap();
    store
        .submit(vec![
            Op::DeleteSession {
                client_id: "a".into(),
            },
            enqueue("a", 1, "new a1"),
            enqueue("b", 1, "b1 again"),
        ])
        .wait_blocking()
        .unwrap();
    store.close();
    let (store, r) = open(dir.path());
    assert_eq!(
        seqs_of(&r),
        vec![
            ("a".to_string(), 1, "new a1".to_string()),
            ("b".to_string(), 1, "b1 again".to_string())
        ]
    );
    store.close();
    assert_eq!(records(dir.path(), "segments"), 1, "the first is all dead");
}

/// A store written before segments (one key per delivery) opens with its deliveries, and
/// each is deleted when done with.
#[test]
fn deliveries_of_a_store_before_segments_are_read_and_deleted_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("queue", KeyspaceCreateOptions::default)
            .unwrap();
        for (id, seq) in [("old", 1u64), ("old", 2), ("x", 7)] {
            ks.insert(queue_key(id, seq), format!("{id}{seq}")).unwrap();
        }
        db.persist(PersistMode::SyncAll).unwrap();
    }
    let (store, r) = open(dir.path());
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64, String)> {
        v.iter()
            .map(|(c, s)| (c.to_string(), *s, format!("{c}{s}")))
            .collect()
    };
    assert_eq!(seqs_of(&r), want(&[("old", 1), ("old", 2), ("x", 7)]));
    store
        .submit(vec![
            dequeue("old", 1),
            enqueue("old", 3, "old3"),
            Op::DeleteSession {
                client_id: "x".into(),
            },
        ])
        .wait_blocking()
        .unwrap();
    store.close();
    assert_eq!(records(dir.path(), "queue"), 1);
    let (store, r) = open(dir.path());
    assert_eq!(seqs_of(&r), want(&[("old", 2), ("old", 3)]));
    store.close();
}

/// A damaged segment refuses the open instead of losing what it holds in silence.
#[test]
fn a_damaged_segment_refuses_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store
        .submit(vec![enqueue("a", 1, "a1")])
        .wait_blocking()
        .unwrap();
    store.close();
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db
            .keyspace("segments", KeyspaceCreateOptions::default)
            .unwrap();
        let (k, v) = ks.iter().next().unwrap().into_inner().unwrap();
        ks.insert(k, &v[..v.len() - 1]).unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
    }
    match Store::open(dir.path(), Sync::Always, Duration::ZERO) {
        Err(StoreError::BadRecord { keyspace }) => assert_eq!(keyspace, "segments"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// Under load (a commit of `GROUP_MIN_OPS` or more), the next commit starts no sooner than the
/// group interval after it; after a small commit the next one goes at once.
#[test]
fn under_load_commits_wait_for_their_group_and_light_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let group = Duration::from_secs(1);
    let (store, _) = Store::open(dir.path(), Sync::Always, group).unwrap();
    let commits = || store.stats().commits.load(Ordering::Relaxed);
    // Light: two small commits, neither waits for a group.
    let light = Instant::now();
    for seq in 1..=2 {
        store
            .submit(vec![enqueue("light", seq, "x")])
            .wait_blocking()
            .unwrap();
    }
    assert!(
        light.elapsed() < group,
        "small commits waited for a group: {:?}",
        light.elapsed()
    );
    // A large commit, then a small one: the small one is not committed before the group
    // interval after the large one started.
    let big: Vec<Op> = (0..GROUP_MIN_OPS as u64)
        .map(|seq| enqueue("big", seq, "y"))
        .collect();
    let started = Instant::now();
    store.submit(big).wait_blocking().unwrap();
    let before = commits();
    store
        .submit(vec![enqueue("next", 1, "z")])
        .wait_blocking()
        .unwrap();
    assert!(
        started.elapsed() >= group,
        "the commit after a large one went at once: {:?}",
        started.elapsed()
    );
    assert_eq!(commits(), before + 1);
    store.close();
    let (store, r) = open(dir.path());
    assert_eq!(r.queued.len(), 2 + GROUP_MIN_OPS + 1);
    store.close();
}

/// Whether segment `n` of a closed store is on disk.
fn has_segment(dir: &Path, n: u64) -> bool {
    let db = Database::builder(dir).open().unwrap();
    let ks = db
        .keyspace("segments", KeyspaceCreateOptions::default)
        .unwrap();
    ks.get(n.to_be_bytes()).unwrap().is_some()
}

/// A segment mostly done with is rewritten once it is old: its live deliveries move into a
/// later commit's segment, so a few long-queued ones cannot keep a whole segment of
/// acknowledged ones on disk; after the move they are found, done with and recovered at their
/// new place.
#[test]
fn a_mostly_done_segment_moves_its_live_deliveries_and_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    store
        .submit((1..=8).map(|s| enqueue("a", s, &format!("a{s}"))).collect())
        .wait_blocking()
        .unwrap();
    // 6 of 8 done: a quarter live, but the segment is young.
    store
        .submit((1..=6).map(|s| dequeue("a", s)).collect())
        .wait_blocking()
        .unwrap();
    store.close();
    assert!(has_segment(dir.path(), 0));
    // Reopening keeps it a candidate. Other traffic writes segments until it is old enough.
    let (store, r) = open(dir.path());
    assert_eq!(r.queued.len(), 2);
    for i in 1..=queue::SPARSE_AGE + 1 {
        store
            .submit(vec![enqueue("c", i, &format!("c{i}")), dequeue("c", i - 1)])
            .wait_blocking()
            .unwrap();
    }
    store.close();
    assert!(!has_segment(dir.path(), 0), "the sparse segment is gone");
    let (store, r) = open(dir.path());
    let last = queue::SPARSE_AGE + 1;
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64, String)> {
        v.iter()
            .map(|(c, s)| (c.to_string(), *s, format!("{c}{s}")))
            .collect()
    };
    assert_eq!(seqs_of(&r), want(&[("a", 7), ("a", 8), ("c", last)]));
    // At their new place they are done with like any other.
    store.submit(vec![dequeue("a", 7)]).wait_blocking().unwrap();
    store.close();
    let (store, r) = open(dir.path());
    assert_eq!(seqs_of(&r), want(&[("a", 8), ("c", last)]));
    store.close();
}
