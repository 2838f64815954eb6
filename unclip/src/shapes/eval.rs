//! Accumulating checker reports over many prompts into an accuracy table.

use std::fmt;

use super::check::{Attribute, CheckReport};
use super::scene::PromptKind;

/// Correct / applicable counts per attribute, per prompt kind and overall.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalTable {
    /// `[attribute][kind]`, kind index 4 is "every kind".
    counts: [[(u32, u32); 5]; 10],
    prompts: [u32; 5],
}

impl EvalTable {
    /// An empty table.
    pub fn new() -> EvalTable {
        EvalTable::default()
    }

    /// Adds one report.
    pub fn add(&mut self, r: &CheckReport) {
        let k = r.kind as usize;
        for k in [k, 4] {
            self.prompts[k] += 1;
            for (a, attr) in Attribute::ALL.into_iter().enumerate() {
                if let Some(ok) = r.get(attr) {
                    self.counts[a][k].0 += u32::from(ok);
                    self.counts[a][k].1 += 1;
                }
            }
        }
    }

    /// (correct, applicable) for an attribute, over one kind or all (`None`).
    pub fn count(&self, attr: Attribute, kind: Option<PromptKind>) -> (u32, u32) {
        self.counts[attr as usize][kind.map_or(4, |k| k as usize)]
    }

    /// Fraction correct, `None` if the attribute never applied.
    pub fn accuracy(&self, attr: Attribute, kind: Option<PromptKind>) -> Option<f64> {
        let (ok, n) = self.count(attr, kind);
        (n > 0).then(|| f64::from(ok) / f64::from(n))
    }

    /// Number of reports added, for one kind or all.
    pub fn prompts(&self, kind: Option<PromptKind>) -> u32 {
        self.prompts[kind.map_or(4, |k| k as usize)]
    }
}

impl fmt::Display for EvalTable {
    /// A table: one row per attribute, one column per prompt kind and "total";
    /// cells are "accuracy% (applicable count)", "-" where it never applied.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<Option<PromptKind>> =
            PromptKind::ALL.into_iter().map(Some).chain([None]).collect();
        write!(f, "{:<11}", "attribute")?;
        for k in &kinds {
            write!(f, " {:>14}", k.map_or("total", PromptKind::name))?;
        }
        writeln!(f)?;
        write!(f, "{:<11}", "prompts")?;
        for &k in &kinds {
            write!(f, " {:>14}", self.prompts(k))?;
        }
        writeln!(f)?;
        for attr in Attribute::ALL {
            write!(f, "{:<11}", attr.name())?;
            for &k in &kinds {
                let (_, n) = self.count(attr, k);
                match self.accuracy(attr, k) {
                    Some(a) => write!(f, " {:>14}", format!("{:.1}% ({n})", 100.0 * a))?,
                    None => write!(f, " {:>14}", "-")?,
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
