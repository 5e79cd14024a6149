//! Structured JSON mutation for the parser fuzz targets: random bytes
//! rarely get past a JSON parser, so the targets also start from a valid
//! document and apply random edits to it (replace a value anywhere by one of
//! another type or an extreme number, drop a key, add one, truncate it),
//! which reaches the typed deserialization behind the syntax.
//!
//! Shared by `criu-bridge/tests/fuzz_manifest.rs` and
//! `tap/tests/fuzz_cut.rs` (included there by path).

use bolero::TypeGenerator;
use serde_json::{json, Value};

/// One edit of a JSON document; `at` picks the node (a pre-order index,
/// modulo the node count).
#[derive(Debug, Clone, TypeGenerator)]
pub enum Edit {
    /// Replace the node by another value.
    Replace { at: u16, with: Leaf },
    /// Remove the node from its parent object or array.
    Remove { at: u16 },
    /// Add a key to the node, if it is an object.
    Insert { at: u16, key: u8, with: Leaf },
}

/// A replacement value: every JSON type, and the numbers that break
/// careless arithmetic.
#[derive(Debug, Clone, TypeGenerator)]
pub enum Leaf {
    Null,
    Bool(bool),
    U64(u64),
    Max,
    Neg(i64),
    Float(f64),
    Str(String),
    EmptyArray,
    EmptyObject,
    Array(Vec<u8>),
}

impl Leaf {
    fn value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => json!(b),
            Leaf::U64(n) => json!(n),
            Leaf::Max => json!(u64::MAX),
            Leaf::Neg(n) => json!(n),
            Leaf::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Leaf::Str(s) => json!(s),
            Leaf::EmptyArray => json!([]),
            Leaf::EmptyObject => json!({}),
            Leaf::Array(v) => json!(v),
        }
    }
}

/// Keys an inserted entry may get: some of the formats' own (so a
/// duplicate or misplaced field is tried), some unknown.
const KEYS: &[&str] = &[
    "schema",
    "version",
    "container_id",
    "broker",
    "queues",
    "next_offset",
    "kind",
    "captured_at_unix_ms",
    "publishes_after_cut",
    "migration_id",
    "mirrors",
    "x-unknown",
    "",
    "../../etc",
];

/// A step from a node to a child.
#[derive(Clone)]
enum Step {
    Index(usize),
    Key(String),
}

/// The path of every node, in pre-order (the root's is empty).
fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Object(o) => {
            for (k, c) in o {
                here.push(Step::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn node<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, s| match (s, v) {
        (Step::Index(i), Value::Array(a)) => a.get_mut(*i),
        (Step::Key(k), Value::Object(o)) => o.get_mut(k),
        _ => None,
    })
}

/// The path of the node `at` picks.
fn pick(doc: &Value, at: u16) -> Vec<Step> {
    let mut all = vec![];
    paths(doc, &mut vec![], &mut all);
    let n = usize::from(at) % all.len();
    all.swap_remove(n)
}

/// `doc` with `edits` applied in order.
pub fn mutate(mut doc: Value, edits: &[Edit]) -> Value {
    for e in edits {
        match e {
            Edit::Replace { at, with } => {
                let path = pick(&doc, *at);
                if let Some(v) = node(&mut doc, &path) {
                    *v = with.value();
                }
            }
            Edit::Remove { at } => {
                let mut path = pick(&doc, *at);
                let Some(last) = path.pop() else { continue };
                match (node(&mut doc, &path), last) {
                    (Some(Value::Array(a)), Step::Index(i)) => {
                        a.remove(i);
                    }
                    (Some(Value::Object(o)), Step::Key(k)) => {
                        o.remove(&k);
                    }
                    _ => {}
                }
            }
            Edit::Insert { at, key, with } => {
                let path = pick(&doc, *at);
                let key = KEYS[usize::from(*key) % KEYS.len()];
                if let Some(Value::Object(o)) = node(&mut doc, &path) {
                    o.insert(key.to_string(), with.value());
                }
            }
        }
    }
    doc
}

/// Every strict prefix of `bytes` (a complete JSON document), for
/// truncation checks; long documents are sampled every `step` bytes.
pub fn prefixes(bytes: &[u8], step: usize) -> impl Iterator<Item = &[u8]> {
    (0..bytes.len())
        .step_by(step.max(1))
        .map(move |n| &bytes[..n])
}
