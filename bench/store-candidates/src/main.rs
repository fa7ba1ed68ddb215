//! Candidate engines for Corvid's durable sessions, same workload each: group commits of B
//! queue inserts (16-byte key, 256-byte value) with an fsync per commit, half of them
//! deleted again (acked) in later commits; then reopen and scan (recovery); then disk use.
use std::path::Path;
use std::time::Instant;

/// Payload bytes per queued message.
const VALUE: usize = 256;

/// A queue key: session (100,000 of them) then sequence number, as corvid-store lays them out.
fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(i % 100_000).to_be_bytes()); // session
    k[8..].copy_from_slice(&i.to_be_bytes()); // sequence
    k
}

/// Bytes under a directory.
fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

/// What the workload needs of an engine.
trait Engine {
    fn commit(&mut self, inserts: &[u64], deletes: &[u64]);
    fn load(&mut self, n: u64); // bulk, unsynced, for the recovery test
    fn reopen_and_scan(&mut self) -> u64;
}

/// fjall: an LSM tree with a journal.
struct Fjall {
    path: std::path::PathBuf,
    db: Option<fjall::Database>,
    ks: Option<fjall::Keyspace>,
}
impl Fjall {
    fn open(path: &Path) -> Self {
        let db = fjall::Database::builder(path).open().unwrap();
        let ks = db
            .keyspace("queue", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        Fjall {
            path: path.into(),
            db: Some(db),
            ks: Some(ks),
        }
    }
}
impl Engine for Fjall {
    fn commit(&mut self, ins: &[u64], del: &[u64]) {
        let db = self.db.as_ref().unwrap();
        let ks = self.ks.as_ref().unwrap();
        let mut b = db.batch().durability(Some(fjall::PersistMode::SyncData));
        let v = [7u8; VALUE];
        for &i in ins {
            b.insert(ks, key(i), v);
        }
        for &i in del {
            b.remove(ks, key(i));
        }
        b.commit().unwrap();
    }
    fn load(&mut self, n: u64) {
        let db = self.db.as_ref().unwrap();
        let ks = self.ks.as_ref().unwrap();
        let v = [7u8; VALUE];
        for c in 0..n / 10_000 {
            let mut b = db.batch();
            for i in c * 10_000..(c + 1) * 10_000 {
                b.insert(ks, key(i + (1 << 32)), v);
            }
            b.commit().unwrap();
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    fn reopen_and_scan(&mut self) -> u64 {
        self.ks = None;
        self.db = None;
        let me = Fjall::open(&self.path);
        let n = me.ks.as_ref().unwrap().iter().count() as u64;
        *self = me;
        n
    }
}

const T: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("queue");
/// redb: a copy-on-write B-tree.
struct Redb {
    path: std::path::PathBuf,
    db: Option<redb::Database>,
}
impl Redb {
    fn open(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let db = redb::Database::create(path.join("db.redb")).unwrap();
        Redb {
            path: path.into(),
            db: Some(db),
        }
    }
}
impl Engine for Redb {
    fn commit(&mut self, ins: &[u64], del: &[u64]) {
        let tx = self.db.as_ref().unwrap().begin_write().unwrap();
        {
            let mut t = tx.open_table(T).unwrap();
            let v = [7u8; VALUE];
            for &i in ins {
                t.insert(&key(i)[..], &v[..]).unwrap();
            }
            for &i in del {
                t.remove(&key(i)[..]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn load(&mut self, n: u64) {
        let v = [7u8; VALUE];
        for c in 0..n / 10_000 {
            let tx = self.db.as_ref().unwrap().begin_write().unwrap();
            {
                let mut t = tx.open_table(T).unwrap();
                for i in c * 10_000..(c + 1) * 10_000 {
                    t.insert(&key(i + (1 << 32))[..], &v[..]).unwrap();
                }
            }
            tx.commit().unwrap();
        }
    }
    fn reopen_and_scan(&mut self) -> u64 {
        self.db = None;
        let me = Redb::open(&self.path);
        let n = {
            use redb::{ReadableDatabase, ReadableTableMetadata};
            let r = me.db.as_ref().unwrap().begin_read().unwrap();
            let t = r.open_table(T).unwrap();
            let mut n = 0u64;
            for e in redb::ReadableTable::iter(&t).unwrap() {
                e.unwrap();
                n += 1;
            }
            let _ = t.len();
            n
        };
        *self = me;
        n
    }
}

/// Runs the workload on one engine and prints its figures.
fn run(name: &str, mut e: Box<dyn Engine>, path: &Path) {
    for batch in [1usize, 64, 512] {
        let commits = match batch {
            1 => 300,
            64 => 300,
            _ => 100,
        };
        let mut seq = 0u64;
        let t = Instant::now();
        for c in 0..commits {
            let ins: Vec<u64> = (0..batch as u64).map(|j| seq + j).collect();
            seq += batch as u64;
            // the previous commit's messages are acked now
            let del: Vec<u64> = if c > 0 {
                (seq - 2 * batch as u64..seq - batch as u64).collect()
            } else {
                vec![]
            };
            e.commit(&ins, &del);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{name}: batch {batch:>3}: {:>8.0} msg/s durable ({:.2} ms per commit)",
            (commits * batch) as f64 / s,
            s * 1e3 / commits as f64
        );
    }
    let n = 1_000_000;
    let t = Instant::now();
    e.load(n);
    println!("{name}: bulk load {n}: {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let got = e.reopen_and_scan();
    println!(
        "{name}: reopen + scan {got} entries: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "{name}: disk {:.0} B per queued message ({} bytes payload)",
        dir_size(path) as f64 / got as f64,
        VALUE
    );
}

fn main() {
    let base = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or("/tmp/storebench/data".into()),
    );
    let _ = std::fs::remove_dir_all(&base);
    let which = std::env::args().nth(2).unwrap_or("both".into());
    if which != "redb" {
        let p = base.join("fjall");
        run("fjall", Box::new(Fjall::open(&p)), &p);
    }
    if which != "fjall" {
        let p = base.join("redb");
        run("redb", Box::new(Redb::open(&p)), &p);
    }
}
