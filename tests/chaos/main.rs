//! Chaos suite (issue 13, item 3): the real binary, its own PostgreSQL 15 cluster, s3s-fs and
//! HAProxy, under concurrent client load while faults are injected. Run with
//! `scripts/chaos.sh` (one scenario at a time: `--test-threads=1`). Every scenario prints one
//! `CHAOS <scenario>: ...` summary line with its true counts, then asserts.

mod disconnect;
mod harness;
mod kill;
mod load;
mod orphans;
mod pg_disk_full;
mod pg_restart;
#[path = "../shared/ports.rs"]
mod ports;
mod replicas;
mod s3_fault;
mod slow_readers;
mod spool_full;
mod stuck_commit;
mod verify;
