//! Canonical spellings of the Human Design values a profile may carry.
//!
//! Values are matched case-insensitively and ignoring spaces, hyphens and other
//! punctuation, so `"manifesting generator"`, `"Manifesting-Generator"` and
//! `"MANIFESTING GENERATOR"` are all `"Manifesting Generator"`. The alias tables list
//! the other names the same thing goes by in common charts.

/// Lower-cased ASCII letters and digits only: the form values are compared in.
fn fold(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `(canonical spelling, other names it is known by)`.
type Table = &'static [(&'static str, &'static [&'static str])];

fn lookup(table: Table, text: &str) -> Option<&'static str> {
    let folded = fold(text);
    table.iter().find_map(|(canonical, aliases)| {
        let matches = fold(canonical) == folded || aliases.iter().any(|a| fold(a) == folded);
        matches.then_some(*canonical)
    })
}

fn names(table: Table) -> String {
    table.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
}

const TYPES: Table = &[
    ("Manifestor", &[]),
    ("Generator", &["pure generator"]),
    ("Manifesting Generator", &["mg"]),
    ("Projector", &[]),
    ("Reflector", &[]),
];

const AUTHORITIES: Table = &[
    (
        "Emotional",
        &["solar plexus", "emotional solar plexus", "emotions"],
    ),
    ("Sacral", &[]),
    ("Splenic", &["spleen"]),
    (
        "Ego",
        &[
            "heart",
            "ego manifested",
            "ego projected",
            "ego heart",
            "will",
        ],
    ),
    (
        "Self-Projected",
        &["self projected", "g center", "g", "identity"],
    ),
    (
        "Mental",
        &[
            "environmental",
            "sounding board",
            "outer",
            "outer authority",
        ],
    ),
    ("Lunar", &["moon", "lunar cycle"]),
];

const DEFINITIONS: Table = &[
    ("Single", &["single definition"]),
    (
        "Split",
        &[
            "split definition",
            "simple split",
            "small split",
            "large split",
        ],
    ),
    ("Triple Split", &["triple", "triple split definition"]),
    (
        "Quadruple Split",
        &["quadruple", "quad split", "quadruple split definition"],
    ),
    ("None", &["no definition", "no"]),
];

const CENTERS: Table = &[
    ("Head", &["crown", "head center"]),
    ("Ajna", &["ajna center", "mind"]),
    ("Throat", &["throat center"]),
    ("G", &["g center", "identity", "self", "identity center"]),
    (
        "Heart",
        &["ego", "will", "heart center", "ego center", "will center"],
    ),
    ("Sacral", &["sacral center"]),
    (
        "Solar Plexus",
        &[
            "emotional",
            "emotions",
            "solar plexus center",
            "emotional center",
        ],
    ),
    ("Spleen", &["splenic", "spleen center", "splenic center"]),
    ("Root", &["root center"]),
];

/// The twelve Human Design profiles (personality line / design line).
const PROFILES: [(u8, u8); 12] = [
    (1, 3),
    (1, 4),
    (2, 4),
    (2, 5),
    (3, 5),
    (3, 6),
    (4, 6),
    (4, 1),
    (5, 1),
    (5, 2),
    (6, 2),
    (6, 3),
];

pub fn hd_type(text: &str) -> Result<&'static str, String> {
    lookup(TYPES, text).ok_or_else(|| format!("must be one of {}", names(TYPES)))
}

pub fn authority(text: &str) -> Result<&'static str, String> {
    lookup(AUTHORITIES, text).ok_or_else(|| format!("must be one of {}", names(AUTHORITIES)))
}

pub fn definition(text: &str) -> Result<&'static str, String> {
    lookup(DEFINITIONS, text).ok_or_else(|| format!("must be one of {}", names(DEFINITIONS)))
}

pub fn center(text: &str) -> Result<&'static str, String> {
    lookup(CENTERS, text).ok_or_else(|| format!("must be one of {}", names(CENTERS)))
}

/// `"2/4"`, `" 2 / 4 "` -> `(2, 4)`; only the twelve real profiles are accepted.
pub fn profile(text: &str) -> Result<(u8, u8), String> {
    let invalid = || "must be one of the twelve profiles written \"N/M\", like \"2/4\"".to_owned();
    let (a, b) = text.split_once('/').ok_or_else(invalid)?;
    let line = |s: &str| s.trim().parse::<u8>().map_err(|_| invalid());
    let pair = (line(a)?, line(b)?);
    PROFILES.contains(&pair).then_some(pair).ok_or_else(invalid)
}

/// A gate number, 1 to 64.
pub fn gate(number: u64) -> Result<u8, String> {
    u8::try_from(number)
        .ok()
        .filter(|g| (1..=64).contains(g))
        .ok_or_else(|| format!("gate {number} is not between 1 and 64"))
}

/// A channel written `"N-M"` between two different gates; returned low gate first.
pub fn channel(text: &str) -> Result<(u8, u8), String> {
    let invalid =
        || format!("channel {text:?} must be two different gates written \"N-M\", like \"20-34\"");
    let (a, b) = text.split_once('-').ok_or_else(invalid)?;
    let gate_of = |s: &str| {
        s.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| gate(n).ok())
            .ok_or_else(invalid)
    };
    let (a, b) = (gate_of(a)?, gate_of(b)?);
    if a == b {
        return Err(invalid());
    }
    Ok((a.min(b), a.max(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_case_and_punctuation_insensitively() {
        assert_eq!(
            hd_type("manifesting generator"),
            Ok("Manifesting Generator")
        );
        assert_eq!(
            hd_type(" MANIFESTING-generator "),
            Ok("Manifesting Generator")
        );
        assert_eq!(authority("solar plexus"), Ok("Emotional"));
        assert_eq!(authority("self projected"), Ok("Self-Projected"));
        assert_eq!(definition("triple split"), Ok("Triple Split"));
        assert_eq!(center("g center"), Ok("G"));
        assert_eq!(center("SOLAR-PLEXUS"), Ok("Solar Plexus"));
    }

    #[test]
    fn rejects_unknown_values_listing_the_choices() {
        let err = hd_type("wizard").expect_err("not a type");
        assert!(err.contains("Manifesting Generator"), "{err}");
        assert!(authority("").is_err());
    }

    #[test]
    fn profiles_and_channels() {
        assert_eq!(profile("2/4"), Ok((2, 4)));
        assert_eq!(profile(" 4 / 1 "), Ok((4, 1)));
        assert!(profile("2/3").is_err());
        assert!(profile("24").is_err());
        assert_eq!(channel("34-20"), Ok((20, 34)));
        assert!(channel("20-20").is_err());
        assert!(channel("0-65").is_err());
        assert_eq!(gate(64), Ok(64));
        assert!(gate(65).is_err());
    }
}
