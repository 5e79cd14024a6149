//! Helpers shared by the fuzz targets.
pub mod json_fuzz;
