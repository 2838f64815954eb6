//! The color palette: ten named colors, chosen far apart in RGB so that a
//! generated pixel can be read back to its name by nearest neighbour.

use std::fmt;

/// A palette color. Every pair is at least ~100 apart (Euclidean, 0..255 RGB),
/// so nearest-palette classification survives the blur and color drift of a
/// small generative model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
    Gray,
    Cyan,
}

impl Color {
    /// Every palette color, in a fixed order (index = `as usize`).
    pub const ALL: [Color; 10] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
        Color::Black,
        Color::Gray,
        Color::Cyan,
    ];

    /// The rendered RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [225, 30, 30],
            Color::Green => [30, 170, 50],
            Color::Blue => [30, 60, 225],
            Color::Yellow => [245, 230, 40],
            Color::Purple => [140, 40, 180],
            Color::Orange => [250, 130, 0],
            Color::White => [245, 245, 245],
            Color::Black => [15, 15, 15],
            Color::Gray => [128, 128, 128],
            Color::Cyan => [40, 215, 225],
        }
    }

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Black => "black",
            Color::Gray => "gray",
            Color::Cyan => "cyan",
        }
    }

    /// Reads a caption word (`grey` is accepted for gray).
    pub fn from_word(word: &str) -> Option<Color> {
        if word == "grey" {
            return Some(Color::Gray);
        }
        Color::ALL.into_iter().find(|c| c.name() == word)
    }

    /// The palette color nearest to an RGB value.
    pub fn nearest(rgb: [f32; 3]) -> Color {
        let mut best = (Color::Red, f32::INFINITY);
        for c in Color::ALL {
            let d = dist2(rgb, c.rgbf());
            if d < best.1 {
                best = (c, d);
            }
        }
        best.0
    }

    /// The RGB value as floats.
    pub fn rgbf(self) -> [f32; 3] {
        self.rgb().map(f32::from)
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Squared Euclidean distance between two RGB values.
pub(crate) fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]) * (a[i] - b[i])).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_well_separated() {
        for (i, a) in Color::ALL.iter().enumerate() {
            assert_eq!(*a as usize, i);
            for b in &Color::ALL[i + 1..] {
                let d = dist2(a.rgbf(), b.rgbf()).sqrt();
                assert!(d >= 100.0, "{a} and {b} are only {d:.0} apart");
            }
        }
    }

    #[test]
    fn words_round_trip() {
        for c in Color::ALL {
            assert_eq!(Color::from_word(c.name()), Some(c));
            assert_eq!(Color::nearest(c.rgbf()), c);
        }
        assert_eq!(Color::from_word("grey"), Some(Color::Gray));
        assert_eq!(Color::from_word("mauve"), None);
    }
}
