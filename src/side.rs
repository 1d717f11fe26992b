//! The two sites tandem keeps in step.

use std::fmt;

/// A site: the on-prem **desktop** database (tag `D`) or the cloud **mobile** database (tag `M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Desktop,
    Mobile,
}

impl Side {
    pub const BOTH: [Side; 2] = [Side::Desktop, Side::Mobile];

    /// The one-letter tag carried by events, markers and checkpoints.
    pub fn tag(self) -> char {
        match self {
            Side::Desktop => 'D',
            Side::Mobile => 'M',
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Desktop => Side::Mobile,
            Side::Mobile => Side::Desktop,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Desktop => "desktop",
            Side::Mobile => "mobile",
        }
    }

    pub fn from_tag(c: char) -> Option<Side> {
        match c {
            'D' => Some(Side::Desktop),
            'M' => Some(Side::Mobile),
            _ => None,
        }
    }

    /// The config's name of the direction that reads this side.
    pub fn direction_key(self) -> &'static str {
        match self {
            Side::Desktop => "desktop_to_mobile",
            Side::Mobile => "mobile_to_desktop",
        }
    }

    /// The replication direction that reads this side: `"D>M"` or `"M>D"`.
    pub fn direction_from(self) -> &'static str {
        match self {
            Side::Desktop => "D>M",
            Side::Mobile => "M>D",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
