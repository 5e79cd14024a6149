//! `ms2m inspect`: what a checkpoint directory holds, from its ms2m
//! manifest, or from CRIU's `stats-dump` when the checkpoint was not taken by
//! the ms2m shim.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use criu_bridge::manifest::Manifest;
use criu_bridge::stats::DumpStats;
use serde::Serialize;

use crate::checkpoint::default_work_path;
use crate::client::absolute;

/// Arguments of `ms2m inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// A checkpoint directory (image path).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// What `ms2m inspect` found.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    /// The directory, absolute.
    pub image_path: String,
    /// Its ms2m manifest, when it has one.
    pub manifest: Option<Manifest>,
    /// CRIU's dump statistics (from the manifest, else `stats-dump`).
    pub stats: Option<DumpStats>,
    /// `manifest` or the `stats-dump` file read.
    pub stats_source: Option<String>,
    /// The publish fence beside the manifest (`ms2m-fence.json`, written by
    /// `ms2m fence`), when there is one.
    pub fence: Option<serde_json::Value>,
}

/// Runs `ms2m inspect`.
pub fn run(args: &InspectArgs) -> Result<InspectReport> {
    let dir = absolute(&args.dir)?;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let manifest = if Manifest::path_in(&dir).exists() {
        Some(Manifest::read(&dir)?)
    } else {
        None
    };
    if !dir.join("inventory.img").exists() {
        // A manifest alone is what a dump that failed part-way can leave
        // (or a copy that lost files): not a checkpoint anything restores.
        anyhow::bail!(
            "{} is not a checkpoint: {}",
            dir.display(),
            if manifest.is_none() {
                "it has neither an ms2m manifest nor CRIU images"
            } else {
                "it has an ms2m manifest but no CRIU images (no inventory.img)"
            }
        );
    }
    let (stats, stats_source) = match manifest.as_ref().and_then(|m| m.stats.clone()) {
        Some(s) => (Some(s), Some("manifest".to_string())),
        None => {
            let mut found = (None, None);
            for d in [dir.clone(), default_work_path(&dir)] {
                let file = d.join(criu_bridge::stats::DUMP_STATS_FILE);
                if file.exists() {
                    let s = criu_bridge::stats::read_dump_stats(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    found = (Some(s), Some(file.display().to_string()));
                    break;
                }
            }
            found
        }
    };
    let fence_file = dir.join(criu_bridge::manifest::FENCE_FILE);
    let fence = match std::fs::read_to_string(&fence_file) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", fence_file.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", fence_file.display())),
    };
    Ok(InspectReport {
        image_path: dir.display().to_string(),
        manifest,
        stats,
        stats_source,
        fence,
    })
}
