//! Fuzz targets for the checkpoint manifest parser (issue 9, bad input):
//! bolero `check!()`s run as ordinary `cargo test`s (see
//! `tap/tests/fuzz_frames.rs` for the knobs). A manifest comes from a
//! checkpoint directory anyone may have written, copied or cut short: for
//! any bytes, `Manifest::from_slice`/`Manifest::read` return a manifest or
//! an error, never panic; what they accept is a valid manifest that
//! survives a write and a read; a truncated manifest is always an error.

mod support;

use bolero::check;
use criu_bridge::manifest::{Manifest, MANIFEST_SCHEMA, MANIFEST_VERSION};
use serde_json::{json, Value};
use support::json_fuzz::{mutate, prefixes, Edit};

/// A manifest as the shim writes one for a tapped container (broker cut,
/// stats, frozen-window results), as JSON.
fn sample() -> Value {
    let mut m = Manifest::new("consumer1");
    m.namespace = Some("ms2m".into());
    m.options.exit = true;
    m.options.tcp_close = true;
    m.options.network_lock = "skip".into();
    m.options.image_path = "/dev/shm/ck".into();
    m.options.work_path = Some("/dev/shm/ck-work".into());
    m.strategy.name = "direct".into();
    m.stats = Some(Default::default());
    m.extensions.insert(
        "broker".into(),
        json!({
            "schema": "ms2m.broker-cut/v1",
            "upstream": "amqp://127.0.0.1:5672/%2f",
            "upstream_reachable": true,
            "after_checkpoint": "closed-for-exit",
            "captured_at": "2026-11-28T02:47:14.750Z",
            "captured_at_unix_ms": 1795834034750u64,
            "connections": 1,
            "queues": [{"name": "orders", "kind": "stream", "next_offset": 314,
                        "in_flight": 0, "delivered": 314, "acked": 314}],
            "quiesce": {"complete": true, "waited_ms": 3, "timeout_ms": 2000, "unsettled": 0}
        }),
    );
    m.extensions.insert(
        "frozen_window".into(),
        json!({"results": {"ms2m tap cut": {"capture_us": 12}}}),
    );
    serde_json::to_value(&m).expect("a manifest encodes")
}

/// What any accepted manifest must be: the schema and a supported version,
/// and it survives a write and a read.
fn accepted(m: &Manifest) {
    assert_eq!(m.schema, MANIFEST_SCHEMA);
    assert!(m.version >= 1 && m.version <= MANIFEST_VERSION);
    let again = Manifest::from_slice(&serde_json::to_vec(m).expect("encodes"))
        .unwrap_or_else(|e| panic!("an accepted manifest does not read back: {e}"));
    assert_eq!(again.container_id, m.container_id);
    assert_eq!(
        again.extensions.keys().collect::<Vec<_>>(),
        m.extensions.keys().collect::<Vec<_>>()
    );
}

fn parse(bytes: &[u8]) {
    match Manifest::from_slice(bytes) {
        Ok(m) => accepted(&m),
        Err(e) => assert!(!e.is_empty(), "an empty error message"),
    }
}

/// Arbitrary bytes: a manifest or an error, never a panic.
#[test]
fn manifest_from_any_bytes() {
    check!().for_each(parse);
}

/// A real manifest with random edits (types swapped, fields dropped or
/// added, extreme numbers, anywhere in the tree, the broker cut included).
#[test]
fn manifest_with_random_edits() {
    let doc = sample();
    check!().with_type::<Vec<Edit>>().for_each(|edits| {
        let bytes = serde_json::to_vec(&mutate(doc.clone(), edits)).expect("encodes");
        parse(&bytes);
    });
}

/// A manifest cut short anywhere is refused ("not valid JSON"), also after
/// random edits; the whole one reads or is refused as before. Each input
/// tries the cut it names and 16 spread over the document (every cut of
/// the real manifest is tried by `read_of_a_truncated_manifest_names_the_file`).
#[test]
fn truncated_manifest_is_an_error() {
    let doc = sample();
    check!()
        .with_type::<(Vec<Edit>, bool, u16)>()
        .for_each(|(edits, pretty, cut)| {
            let v = mutate(doc.clone(), edits);
            let bytes = if *pretty {
                serde_json::to_vec_pretty(&v)
            } else {
                serde_json::to_vec(&v)
            }
            .expect("encodes");
            let named = &bytes[..usize::from(*cut) % bytes.len()];
            for p in prefixes(&bytes, bytes.len() / 16).chain([named]) {
                let e = Manifest::from_slice(p).expect_err("a truncated manifest was accepted");
                // (a prefix of a bare number, left by an edit of the root,
                // can be valid JSON; never of an object)
                if v.is_object() {
                    assert!(e.starts_with("not valid JSON"), "{e}");
                }
            }
            parse(&bytes);
        });
}

/// `Manifest::read` on a directory whose manifest is cut short: an error
/// that names the file, for every length.
#[test]
fn read_of_a_truncated_manifest_names_the_file() {
    let dir = std::env::temp_dir().join(format!("ms2m-fuzz-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let full = serde_json::to_vec_pretty(&sample()).expect("encodes");
    let path = Manifest::path_in(&dir);
    for p in prefixes(&full, 1) {
        std::fs::write(&path, p).expect("write");
        let e = Manifest::read(&dir).expect_err("a truncated manifest was read");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
    std::fs::write(&path, &full).expect("write");
    let m = Manifest::read(&dir).expect("the whole manifest reads");
    assert_eq!(m.container_id, "consumer1");
    std::fs::remove_dir_all(&dir).ok();
}
