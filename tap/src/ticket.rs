//! What a live migration's checkpoint carries for its target: the
//! [`Ticket`] (`ms2m-migration.json`), and the ids and room names derived
//! from it. Plain data, so that the restore options ([`crate::Resume`])
//! can name a shadow without depending on the migration's machinery.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::TapError;

/// File `ms2m migrate` writes into the checkpoint it ships to the target: a
/// restore of a directory holding it is the shadow of a live migration.
pub const TICKET_FILE: &str = "ms2m-migration.json";
/// Schema tag of [`Ticket`].
pub const TICKET_SCHEMA: &str = "ms2m.migration/v1";

/// What a live migration's checkpoint carries for the target (see
/// [`TICKET_FILE`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ticket {
    /// Always [`TICKET_SCHEMA`].
    pub schema: String,
    /// The migration, unique per attempt; names the broker room.
    pub migration_id: String,
    /// The source container's id (on the source host).
    pub source_container: String,
    /// [`Cut::captured_at_unix_ms`](crate::Cut::captured_at_unix_ms) of the
    /// checkpoint's cut: the source counts its publishes from there.
    pub cut_taken_at_unix_ms: u64,
    /// Classic queues the target replays from the source's mirror streams
    /// first (queue → stream; see [`crate::mirror`]). Empty when the app
    /// consumes only streams.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrors: BTreeMap<String, String>,
}

impl Ticket {
    /// A ticket for migration `migration_id` of `source_container` from the
    /// checkpoint whose cut was taken at `cut_taken_at_unix_ms`.
    pub fn new(migration_id: &str, source_container: &str, cut_taken_at_unix_ms: u64) -> Ticket {
        Ticket {
            schema: TICKET_SCHEMA.to_string(),
            migration_id: migration_id.to_string(),
            source_container: source_container.to_string(),
            cut_taken_at_unix_ms,
            mirrors: BTreeMap::new(),
        }
    }

    /// The broker room (routing key) of this migration's signals.
    pub fn room(&self) -> String {
        room_of(&self.migration_id)
    }

    /// Checks the schema and that the migration id is usable as a room name.
    pub fn validate(&self) -> Result<(), TapError> {
        if self.schema != TICKET_SCHEMA {
            return Err(TapError::Config(format!(
                "migration ticket schema {:?} is not {TICKET_SCHEMA:?}",
                self.schema
            )));
        }
        validate_migration_id(&self.migration_id)
    }
}

/// The broker room (routing key) of migration `migration_id`.
pub fn room_of(migration_id: &str) -> String {
    format!("ms2m.migration.{migration_id}")
}

/// An id usable for a migration or a mirror: the container id with
/// characters outside `[A-Za-z0-9._-]` replaced (at most 96), then `-ms`.
pub fn id_for(container_id: &str, unix_ms: u128) -> String {
    let mut base: String = container_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(96)
        .collect();
    if base.starts_with('.') || base.is_empty() {
        base.insert(0, 'c');
    }
    format!("{base}-{unix_ms}")
}

/// A migration id is 1-128 characters of `[A-Za-z0-9._-]` (it becomes a
/// routing key and a directory name on the target).
pub fn validate_migration_id(id: &str) -> Result<(), TapError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(TapError::Config(format!(
            "migration id {id:?}: use 1-128 characters of A-Z a-z 0-9 . _ - (not starting with .)"
        )))
    }
}

/// Restore option: this tap is the shadow (target) of a live migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    /// The ticket shipped with the checkpoint.
    pub ticket: Ticket,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_and_tickets() {
        assert!(validate_migration_id("c1-1733500000000").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "x#", &"x".repeat(129)] {
            assert!(validate_migration_id(bad).is_err(), "{bad:?}");
        }
        let t = Ticket::new("m1", "c1", 5);
        assert!(t.validate().is_ok());
        assert_eq!(t.room(), "ms2m.migration.m1");
        let mut bad = t.clone();
        bad.schema = "other".into();
        assert!(bad.validate().is_err());
    }
}
