//! Brace patterns for shard lists, as webdataset and img2dataset users write them:
//! `data/{00000..00099}.tar` (numeric ranges keep the zero padding of the first bound) and
//! `{train,val}/{0..3}.tar` (alternatives); several braces multiply out, left to right.

use super::{DataError, DataResult};

/// Refuses patterns that would expand to more names than any dataset needs (a typo such as
/// `{0..99999999}` should be an error, not an allocation of gigabytes).
const MAX_NAMES: usize = 10_000_000;

/// Every name `pattern` stands for, in order. A pattern without braces is itself.
pub fn expand_braces(pattern: &str) -> DataResult<Vec<String>> {
    let err = |reason: &str| DataError::Pattern { pattern: pattern.into(), reason: reason.into() };
    let mut names = vec![String::new()];
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let close =
            rest[open..].find('}').map(|c| open + c).ok_or_else(|| err("'{' without '}'"))?;
        let inner = &rest[open + 1..close];
        if inner.contains('{') {
            return Err(err("nested braces are not supported"));
        }
        let prefix = &rest[..open];
        if prefix.contains('}') {
            return Err(err("'}' without '{'"));
        }
        let options = alternatives(inner).map_err(|r| err(&r))?;
        if names.len().saturating_mul(options.len()) > MAX_NAMES {
            return Err(err(&format!("expands to more than {MAX_NAMES} names")));
        }
        names = names
            .iter()
            .flat_map(|n| options.iter().map(move |o| format!("{n}{prefix}{o}")))
            .collect();
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(err("'}' without '{'"));
    }
    for n in &mut names {
        n.push_str(rest);
    }
    Ok(names)
}

/// The strings one brace stands for: a range `a..b` or a comma list.
fn alternatives(inner: &str) -> Result<Vec<String>, String> {
    if let Some((a, b)) = inner.split_once("..") {
        let parse = |s: &str| {
            s.parse::<u64>().map_err(|_| format!("range bound {s:?} is not a non-negative integer"))
        };
        let (lo, hi) = (parse(a)?, parse(b)?);
        if lo > hi {
            return Err(format!("range {inner:?} runs backwards"));
        }
        if (hi - lo) as usize >= MAX_NAMES {
            return Err(format!("range {inner:?} has more than {MAX_NAMES} names"));
        }
        // Zero padding when the first bound is written with leading zeros (or both bounds have
        // the same width), as in `{00000..00099}`.
        let width =
            if a.len() > 1 && a.starts_with('0') || a.len() == b.len() { a.len() } else { 0 };
        return Ok((lo..=hi).map(|i| format!("{i:0width$}")).collect());
    }
    if inner.is_empty() {
        return Err("empty braces".into());
    }
    Ok(inner.split(',').map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_padding() {
        assert_eq!(expand_braces("a.tar").unwrap(), ["a.tar"]);
        assert_eq!(
            expand_braces("d/{00008..00011}.tar").unwrap(),
            ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(
            expand_braces("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        for bad in ["{0..", "x}", "{3..1}", "{}", "{a{b}}", "{x..2}", "{0..99999999999}"] {
            let e = expand_braces(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
