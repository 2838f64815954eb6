//! The loss log: one CSV row per step, flushed as it is written so a crash loses at most the
//! line being written; on resume the rows past the checkpoint are dropped so none repeat.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The fixed columns, before any extra ones.
pub const BASE_COLUMNS: [&str; 5] = ["step", "loss", "lr", "grad_norm", "secs"];

/// One step's numbers. `step` counts completed steps (1 for the first update).
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall-clock seconds of training so far.
    pub secs: f64,
    /// Values of the extra columns, in the order given at creation.
    pub extra: Vec<f64>,
}

/// Appends [`LogRow`]s to a CSV file.
#[derive(Debug)]
pub struct CsvLogger {
    path: PathBuf,
    file: std::fs::File,
    columns: Vec<String>,
}

fn header(extra: &[&str]) -> Result<Vec<String>> {
    let mut cols: Vec<String> = BASE_COLUMNS.iter().map(|s| s.to_string()).collect();
    for name in extra {
        let ok = !name.is_empty()
            && !name.contains([',', '\n', '\r', '"'])
            && !cols.iter().any(|c| c == name);
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "bad or repeated CSV column name {name:?}"
            )));
        }
        cols.push(name.to_string());
    }
    Ok(cols)
}

impl CsvLogger {
    /// A new log at `path` (replacing any old one) with the base columns and `extra` ones.
    pub fn create(path: &Path, extra: &[&str]) -> Result<Self> {
        let columns = header(extra)?;
        let text = format!("{}\n", columns.join(","));
        crate::fsutil::atomic_write(path, |tmp| {
            std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e))
        })?;
        Self::open_append(path, columns)
    }

    /// Continues the log at `path` after `completed` steps: rows with `step > completed` (and a
    /// torn last line) are removed, atomically, and new rows are appended. Creates the log when
    /// it does not exist; a different header is an error.
    pub fn resume(path: &Path, extra: &[&str], completed: u64) -> Result<Self> {
        if !path.exists() {
            return Self::create(path, extra);
        }
        let columns = header(extra)?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut lines = text.split_inclusive('\n');
        let first = lines.next().unwrap_or("").trim_end();
        if first != columns.join(",") {
            return Err(Error::InvalidArgument(format!(
                "{}: header {first:?} differs from the expected {:?}",
                path.display(),
                columns.join(",")
            )));
        }
        let mut kept = format!("{first}\n");
        for line in lines {
            if !line.ends_with('\n') {
                break; // torn by a crash mid-write
            }
            let step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
            match step {
                Some(s) if s <= completed => kept.push_str(line),
                Some(_) => {}
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: unreadable row {:?}",
                        path.display(),
                        line.trim_end()
                    )));
                }
            }
        }
        crate::fsutil::atomic_write(path, |tmp| {
            std::fs::write(tmp, &kept).map_err(|e| Error::io(tmp, e))
        })?;
        Self::open_append(path, columns)
    }

    fn open_append(path: &Path, columns: Vec<String>) -> Result<Self> {
        let file =
            std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file, columns })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Appends one row and flushes it to the file.
    pub fn log(&mut self, row: &LogRow) -> Result<()> {
        let n_extra = self.columns.len() - BASE_COLUMNS.len();
        if row.extra.len() != n_extra {
            return Err(Error::InvalidArgument(format!(
                "{} extra value(s) for {n_extra} extra column(s)",
                row.extra.len()
            )));
        }
        let mut line =
            format!("{},{},{},{},{}", row.step, row.loss, row.lr, row.grad_norm, row.secs);
        for v in &row.extra {
            line.push_str(&format!(",{v}"));
        }
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// A loss log read back: column names and rows of numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct LossLog {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<f64>>,
}

impl LossLog {
    /// All values of column `name`.
    pub fn column(&self, name: &str) -> Option<Vec<f64>> {
        let i = self.columns.iter().position(|c| c == name)?;
        Some(self.rows.iter().map(|r| r[i]).collect())
    }

    /// `(step, loss)` pairs, for [`super::plot_loss_curve`].
    pub fn loss_series(&self) -> Option<Vec<(f64, f64)>> {
        Some(self.column("step")?.into_iter().zip(self.column("loss")?).collect())
    }
}

/// Reads a CSV log written by [`CsvLogger`] (a torn last line is ignored).
pub fn read_csv(path: &Path) -> Result<LossLog> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.split_inclusive('\n');
    let columns: Vec<String> =
        lines.next().unwrap_or("").trim_end().split(',').map(str::to_string).collect();
    let mut rows = Vec::new();
    for line in lines.filter(|l| l.ends_with('\n') && !l.trim().is_empty()) {
        let row = line
            .trim_end()
            .split(',')
            .map(|v| v.parse::<f64>())
            .collect::<std::result::Result<Vec<f64>, _>>()
            .ok()
            .filter(|r| r.len() == columns.len())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{}: bad row {:?}", path.display(), line.trim_end()))
            })?;
        rows.push(row);
    }
    Ok(LossLog { columns, rows })
}
