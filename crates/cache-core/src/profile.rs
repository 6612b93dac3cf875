//! The profile a client sends, its validation, and its canonical form.
//!
//! [`ProfileInput`] mirrors the JSON body of `POST /narrative`. It rejects unknown
//! fields (that is what keeps birth data out) and every check names the field it is
//! about. [`ProfileInput::canonicalize`] turns a valid input into a
//! [`CanonicalProfile`]: only the fields the prompt reads, names normalized, lists
//! sorted and deduplicated, percentages quantized. Its [`CanonicalProfile::to_json`] is
//! the exact byte string the cache key's digest covers.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::{Deserialize, Deserializer};

use crate::quantize::{QuantizationStep, Thousandths};
use crate::vocabulary;

pub const MAX_SYSTEMS: usize = 24;
pub const MAX_NAME_CHARS: usize = 64;
pub const MAX_LIST_ITEMS: usize = 64;
pub const MAX_TOKEN_CHARS: usize = 32;
pub const MAX_USER_ID_CHARS: usize = 256;
/// The sum of the percentages as sent may be off 100 by this much.
pub const SUM_TOLERANCE: f64 = 1.0;

/// A rejected profile: which field, and why. Fields are written as JSON paths
/// (`hdData.type`, `percentages.Sirius`, `hybrid[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProfileError {
    pub field: String,
    pub message: String,
}

impl ProfileError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The body of `POST /narrative` as sent. Required fields are `Option`s so that a
/// missing one gets our message naming it rather than serde's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileInput {
    pub classification: Option<String>,
    pub primary: Option<String>,
    pub hybrid: Option<Vec<String>>,
    pub percentages: Option<Percentages>,
    pub hd_data: Option<HdDataInput>,
    pub user_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HdDataInput {
    #[serde(rename = "type")]
    pub hd_type: Option<String>,
    pub authority: Option<String>,
    pub profile: Option<String>,
    pub definition: Option<String>,
    pub centers: Option<Vec<Token>>,
    pub channels: Option<Vec<Token>>,
    pub gates: Option<Vec<Token>>,
}

/// A list item that clients send either as a number or as a string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Token {
    Number(u64),
    Text(String),
}

/// The `percentages` object in the order it was sent, duplicates kept, so that two
/// spellings of one name can be reported instead of one silently winning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Percentages(pub Vec<(String, f64)>);

impl<'de> Deserialize<'de> for Percentages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Percentages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of star-system names to numbers")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    if entries.len() == MAX_SYSTEMS * 4 {
                        return Err(serde::de::Error::custom("too many entries"));
                    }
                    entries.push(entry);
                }
                Ok(Percentages(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl ProfileInput {
    /// Parses a JSON body: exactly one JSON document (only whitespace may follow it).
    /// Syntax errors, wrong types and unknown fields are reported with the path of the
    /// offending field.
    pub fn from_json(body: &[u8]) -> Result<Self, ProfileError> {
        // Tracking the path costs on every parse; only a rejected body needs it.
        // `from_slice` refuses trailing data itself.
        if let Ok(input) = serde_json::from_slice(body) {
            return Ok(input);
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let input: Self = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let message = inner.to_string();
            // Broken JSON, or JSON that is not an object, is about the body as a whole.
            let whole_body = inner.is_syntax()
                || inner.is_eof()
                || path == "."
                || path == "?"
                || path.starts_with('[');
            let field = if whole_body { "body".to_owned() } else { path };
            if message.starts_with("unknown field") {
                return ProfileError::new(
                    field,
                    "unknown field; birth data and other extra fields are not accepted",
                );
            }
            ProfileError::new(field, strip_position(&message))
        })?;
        // The document parsed, so what made `from_slice` fail comes after it: a second
        // document, or anything else. A body is one document.
        de.end().map_err(|_| {
            ProfileError::new("body", "must be one JSON document, with nothing after it")
        })?;
        Ok(input)
    }

    /// Validates the input and returns its canonical form for the given step.
    pub fn canonicalize(&self, step: QuantizationStep) -> Result<CanonicalProfile, ProfileError> {
        self.canonicalize_checked(step, SumCheck::AsSent)
    }

    fn canonicalize_checked(
        &self,
        step: QuantizationStep,
        sum_check: SumCheck,
    ) -> Result<CanonicalProfile, ProfileError> {
        // Exhaustive on purpose: a new field must decide whether it changes the narrative.
        let Self {
            classification,
            primary,
            hybrid,
            percentages,
            hd_data,
            user_id,
        } = self;

        if let Some(user_id) = user_id {
            let chars = user_id.chars().count();
            if chars == 0 || chars > MAX_USER_ID_CHARS {
                return Err(ProfileError::new(
                    "userId",
                    format!("must be 1 to {MAX_USER_ID_CHARS} characters"),
                ));
            }
        }
        let classification = parse_classification(classification.as_deref())?;
        let (percentages, known) = canonical_percentages(percentages.as_ref(), step, sum_check)?;
        let in_percentages = |field: String, name: String| {
            if known.contains_key(&name) {
                Ok(name)
            } else {
                Err(ProfileError::new(
                    field,
                    format!("{name:?} must also appear in percentages"),
                ))
            }
        };

        let (primary, hybrid) = match classification {
            Classification::Primary => {
                if hybrid.is_some() {
                    return Err(ProfileError::new(
                        "hybrid",
                        "only allowed when classification is \"hybrid\"",
                    ));
                }
                let raw = primary.as_deref().ok_or_else(|| {
                    ProfileError::new("primary", "is required when classification is \"primary\"")
                })?;
                let name = normalize_name(raw).map_err(|m| ProfileError::new("primary", m))?;
                (Some(in_percentages("primary".into(), name)?), Vec::new())
            }
            Classification::Hybrid => {
                if primary.is_some() {
                    return Err(ProfileError::new(
                        "primary",
                        "only allowed when classification is \"primary\"",
                    ));
                }
                let raw = hybrid.as_deref().ok_or_else(|| {
                    ProfileError::new("hybrid", "is required when classification is \"hybrid\"")
                })?;
                if !(2..=3).contains(&raw.len()) {
                    return Err(ProfileError::new("hybrid", "must list 2 or 3 star systems"));
                }
                let mut names = Vec::with_capacity(raw.len());
                for (i, raw) in raw.iter().enumerate() {
                    let field = format!("hybrid[{i}]");
                    let name =
                        normalize_name(raw).map_err(|m| ProfileError::new(field.clone(), m))?;
                    if names.contains(&name) {
                        return Err(ProfileError::new(
                            field,
                            format!("{name:?} is listed twice"),
                        ));
                    }
                    names.push(in_percentages(field, name)?);
                }
                names.sort();
                (None, names)
            }
        };

        let hd = canonical_hd(hd_data.as_ref())?;
        Ok(CanonicalProfile {
            classification,
            primary,
            hybrid,
            percentages,
            hd,
            step,
        })
    }
}

/// serde_json appends " at line 1 column 7"; the field name says more to a client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Classification {
    Primary,
    Hybrid,
}

impl Classification {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Hybrid => "hybrid",
        }
    }
}

fn parse_classification(raw: Option<&str>) -> Result<Classification, ProfileError> {
    let raw = raw.ok_or_else(|| ProfileError::new("classification", "is required"))?;
    match raw.trim().to_ascii_lowercase().as_str() {
        "primary" => Ok(Classification::Primary),
        "hybrid" => Ok(Classification::Hybrid),
        _ => Err(ProfileError::new(
            "classification",
            "must be \"primary\" or \"hybrid\"",
        )),
    }
}

/// What a star-system name may hold besides letters, digits and spaces. Nothing that
/// could end the quoted data a name becomes in the prompt (`"`, `<`, a line break) is
/// among them.
pub const NAME_PUNCTUATION: [char; 3] = ['\'', '-', '.'];

/// Why a name was refused for what it holds, as its error message says it.
pub const NAME_CHARACTERS: &str =
    "may hold only letters, digits, spaces and ' - . (no control, format or other characters)";

/// Trims, collapses inner whitespace and writes each word in Title Case (also after a
/// hyphen: `"alpha-centauri"` is `"Alpha-Centauri"`). Letters, digits, whitespace and
/// [`NAME_PUNCTUATION`] only: control and format characters (NUL, bidi overrides,
/// zero-width joiners) and every other symbol are refused, so a name is a name when
/// it reaches the prompt.
pub fn normalize_name(raw: &str) -> Result<String, String> {
    if !raw
        .chars()
        .all(|c| c.is_alphanumeric() || c.is_whitespace() || NAME_PUNCTUATION.contains(&c))
    {
        return Err(NAME_CHARACTERS.to_owned());
    }
    let mut name = String::with_capacity(raw.len());
    let mut capitalize_next = true;
    for (i, word) in raw.split_whitespace().enumerate() {
        if i > 0 {
            name.push(' ');
            capitalize_next = true;
        }
        for c in word.chars() {
            if capitalize_next && c.is_alphanumeric() {
                name.extend(c.to_uppercase());
                capitalize_next = false;
            } else {
                name.extend(c.to_lowercase());
                capitalize_next = c == '-';
            }
        }
    }
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "must be at most {MAX_NAME_CHARS} characters, got {chars}"
        ));
    }
    Ok(name)
}

/// The star systems a deployment knows (`STAR_SYSTEM_NAMES`), when it refuses others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSystems(std::collections::BTreeSet<String>);

impl KnownSystems {
    /// A comma-separated list of names, each normalized as a request's would be.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut names = std::collections::BTreeSet::new();
        for raw in list.split(',').filter(|raw| !raw.trim().is_empty()) {
            names.insert(normalize_name(raw).map_err(|m| format!("{raw:?} {m}"))?);
        }
        if names.is_empty() {
            return Err("must list at least one star-system name".to_owned());
        }
        Ok(Self(names))
    }

    /// Refuses a profile naming a system not in the list: in its shares, and as its
    /// primary or hybrid systems (which may name a share that quantized to zero and
    /// left the shares, yet still reach the prompt).
    pub fn check(&self, profile: &CanonicalProfile) -> Result<(), ProfileError> {
        let unknown = |name: &String| !self.0.contains(name);
        let refuse = |field: String| {
            Err(ProfileError::new(
                field,
                "is not a star system this service knows (STAR_SYSTEM_NAMES)",
            ))
        };
        if profile.primary.as_ref().is_some_and(unknown) {
            return refuse("primary".to_owned());
        }
        if let Some(i) = profile.hybrid.iter().position(unknown) {
            return refuse(format!("hybrid[{i}]"));
        }
        match profile.percentages.iter().find(|(name, _)| unknown(name)) {
            Some((name, _)) => refuse(format!("percentages.{name}")),
            None => Ok(()),
        }
    }
}

/// Quantized entries sorted by name, zeros dropped.
type Shares = Vec<(String, Thousandths)>;

/// Whether the shares must sum to 100: as a client sent them, yes; read back from a
/// canonical form, no, since flooring each share to the step may have taken up to a
/// step from each (four shares at 0.5 can sum to 98).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SumCheck {
    AsSent,
    Canonical,
}

/// Returns the quantized entries and every normalized name as sent (with its rounded
/// share), which `primary` and `hybrid` must be among.
fn canonical_percentages(
    raw: Option<&Percentages>,
    step: QuantizationStep,
    sum_check: SumCheck,
) -> Result<(Shares, BTreeMap<String, Thousandths>), ProfileError> {
    let raw = raw.ok_or_else(|| ProfileError::new("percentages", "is required"))?;
    if raw.0.is_empty() || raw.0.len() > MAX_SYSTEMS {
        return Err(ProfileError::new(
            "percentages",
            format!("must have 1 to {MAX_SYSTEMS} star systems"),
        ));
    }
    let mut by_name = BTreeMap::new();
    let mut sum = 0.0;
    for (raw_name, value) in &raw.0 {
        let field = || format!("percentages.{raw_name}");
        let name = normalize_name(raw_name).map_err(|message| {
            if message == NAME_CHARACTERS {
                // The field would echo the very characters refused: name the map.
                ProfileError::new("percentages", format!("a star-system name {message}"))
            } else {
                ProfileError::new(field(), message)
            }
        })?;
        let rounded = Thousandths::round_from_f64(*value)
            .filter(|t| *t <= Thousandths(100_000))
            .ok_or_else(|| ProfileError::new(field(), "must be a number from 0 to 100"))?;
        if by_name.contains_key(&name) {
            return Err(ProfileError::new(
                field(),
                format!("names the same star system as another entry ({name:?})"),
            ));
        }
        by_name.insert(name, rounded);
        sum += value;
    }
    if sum_check == SumCheck::AsSent && (sum - 100.0).abs() > SUM_TOLERANCE + 1e-9 {
        return Err(ProfileError::new(
            "percentages",
            format!("must sum to 100 (+/- {SUM_TOLERANCE}), got {sum}"),
        ));
    }
    let quantized = by_name
        .iter()
        .map(|(name, value)| (name.clone(), value.floor_to(step)))
        .filter(|(_, value)| value.0 > 0)
        .collect();
    Ok((quantized, by_name))
}

fn canonical_hd(raw: Option<&HdDataInput>) -> Result<HdData, ProfileError> {
    let raw = raw.ok_or_else(|| ProfileError::new("hdData", "is required"))?;
    let HdDataInput {
        hd_type,
        authority,
        profile,
        definition,
        centers,
        channels,
        gates,
    } = raw;
    fn required<'a>(value: &'a Option<String>, field: &str) -> Result<&'a str, ProfileError> {
        value
            .as_deref()
            .ok_or_else(|| ProfileError::new(format!("hdData.{field}"), "is required"))
    }
    fn named(field: &'static str) -> impl Fn(String) -> ProfileError {
        move |m| ProfileError::new(format!("hdData.{field}"), m)
    }

    let hd_type = vocabulary::hd_type(required(hd_type, "type")?).map_err(named("type"))?;
    let authority =
        vocabulary::authority(required(authority, "authority")?).map_err(named("authority"))?;
    let profile = vocabulary::profile(required(profile, "profile")?).map_err(named("profile"))?;
    let definition = definition
        .as_deref()
        .map(vocabulary::definition)
        .transpose()
        .map_err(named("definition"))?;

    let centers = canonical_list(centers.as_deref(), "centers", |token| match token {
        Token::Text(text) => vocabulary::center(text),
        Token::Number(_) => Err("must be a center name".to_owned()),
    })?;
    let channels = canonical_list(channels.as_deref(), "channels", |token| match token {
        Token::Text(text) => vocabulary::channel(text),
        Token::Number(_) => Err("must be written \"N-M\", like \"20-34\"".to_owned()),
    })?;
    let gates = canonical_list(gates.as_deref(), "gates", |token| match token {
        Token::Number(n) => vocabulary::gate(*n),
        Token::Text(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{text:?} is not a gate number"))
            .and_then(vocabulary::gate),
    })?;
    Ok(HdData {
        hd_type,
        authority,
        profile,
        definition,
        centers,
        channels,
        gates,
    })
}

/// Checks list limits, parses each item, then sorts and deduplicates: order and
/// repetition do not change the meaning of a set of centers, channels or gates.
fn canonical_list<T: Ord>(
    raw: Option<&[Token]>,
    name: &str,
    parse: impl Fn(&Token) -> Result<T, String>,
) -> Result<Vec<T>, ProfileError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if raw.len() > MAX_LIST_ITEMS {
        return Err(ProfileError::new(
            format!("hdData.{name}"),
            format!("must have at most {MAX_LIST_ITEMS} items"),
        ));
    }
    let mut items = Vec::with_capacity(raw.len());
    for (i, token) in raw.iter().enumerate() {
        let field = || format!("hdData.{name}[{i}]");
        if let Token::Text(text) = token {
            if text.chars().count() > MAX_TOKEN_CHARS {
                return Err(ProfileError::new(
                    field(),
                    format!("must be at most {MAX_TOKEN_CHARS} characters"),
                ));
            }
        }
        items.push(parse(token).map_err(|m| ProfileError::new(field(), m))?);
    }
    items.sort();
    items.dedup();
    Ok(items)
}

/// A validated profile in canonical form: what the prompt reads, and all the key covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CanonicalProfile {
    pub classification: Classification,
    /// Set for `primary` profiles.
    pub primary: Option<String>,
    /// Sorted; empty for `primary` profiles.
    pub hybrid: Vec<String>,
    /// Sorted by name; entries that quantize to 0 are dropped.
    pub percentages: Shares,
    pub hd: HdData,
    pub step: QuantizationStep,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HdData {
    pub hd_type: &'static str,
    pub authority: &'static str,
    pub profile: (u8, u8),
    pub definition: Option<&'static str>,
    pub centers: Vec<&'static str>,
    pub channels: Vec<(u8, u8)>,
    pub gates: Vec<u8>,
}

impl CanonicalProfile {
    /// The star system a profile is mostly about: the primary, or the hybrid member
    /// with the largest share (ties broken by name).
    pub fn primary_system(&self) -> &str {
        if let Some(primary) = &self.primary {
            return primary;
        }
        let share = |name: &String| {
            self.percentages
                .iter()
                .find(|(n, _)| n == name)
                .map_or(Thousandths(0), |(_, v)| *v)
        };
        self.hybrid
            .iter()
            .max_by(|a, b| share(a).cmp(&share(b)).then_with(|| b.cmp(a)))
            .map_or("", String::as_str)
    }

    /// Reads back what [`Self::to_json`] wrote (a job's profile, say). Canonicalizing is
    /// idempotent, so this validates the profile again and then insists it writes the
    /// very same bytes: anything else was not canonical, and would not match its key.
    pub fn from_json(text: &str) -> Result<Self, ProfileError> {
        let (input, step) = Self::read(text)?;
        let profile = input.canonicalize_checked(step, SumCheck::Canonical)?;
        if profile.to_json() != text {
            return Err(ProfileError::new("canonical", "not in canonical form"));
        }
        Ok(profile)
    }

    /// Reads a canonical profile however it was re-formatted (Postgres's `jsonb`
    /// reorders keys) and under whatever step it was written, and canonicalizes it
    /// again at `step`: how a profile counted for popularity is keyed today.
    pub fn requantize(text: &str, step: QuantizationStep) -> Result<Self, ProfileError> {
        let (input, _) = Self::read(text)?;
        input.canonicalize_checked(step, SumCheck::Canonical)
    }

    /// The profile's fields and the step written with them.
    fn read(text: &str) -> Result<(ProfileInput, QuantizationStep), ProfileError> {
        let invalid = |message: String| ProfileError::new("canonical", message);
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let step = value
            .as_object_mut()
            .and_then(|object| object.remove("quantizationStep"))
            .ok_or_else(|| invalid("quantizationStep is missing".to_owned()))?;
        let step: QuantizationStep = step
            .to_string()
            .parse()
            .map_err(|e: crate::quantize::InvalidStep| invalid(e.to_string()))?;
        let input: ProfileInput =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        Ok((input, step))
    }

    /// The canonical JSON: compact, keys sorted, no optional field written as null.
    /// These are the bytes the digest covers; golden vectors pin them.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"classification\":");
        push_str(&mut out, self.classification.as_str());
        out.push_str(",\"hdData\":");
        self.hd.write_json(&mut out);
        if !self.hybrid.is_empty() {
            out.push_str(",\"hybrid\":[");
            push_joined(&mut out, &self.hybrid, |out, name| push_str(out, name));
            out.push(']');
        }
        out.push_str(",\"percentages\":{");
        push_joined(&mut out, &self.percentages, |out, (name, value)| {
            push_str(out, name);
            let _ = write!(out, ":{value}");
        });
        out.push('}');
        if let Some(primary) = &self.primary {
            out.push_str(",\"primary\":");
            push_str(&mut out, primary);
        }
        let _ = write!(out, ",\"quantizationStep\":{}}}", self.step);
        out
    }
}

impl HdData {
    fn write_json(&self, out: &mut String) {
        out.push_str("{\"authority\":");
        push_str(out, self.authority);
        if !self.centers.is_empty() {
            out.push_str(",\"centers\":[");
            push_joined(out, &self.centers, |out, c| push_str(out, c));
            out.push(']');
        }
        if !self.channels.is_empty() {
            out.push_str(",\"channels\":[");
            push_joined(out, &self.channels, |out, (a, b)| {
                let _ = write!(out, "\"{a}-{b}\"");
            });
            out.push(']');
        }
        if let Some(definition) = self.definition {
            out.push_str(",\"definition\":");
            push_str(out, definition);
        }
        if !self.gates.is_empty() {
            out.push_str(",\"gates\":[");
            push_joined(out, &self.gates, |out, g| {
                let _ = write!(out, "{g}");
            });
            out.push(']');
        }
        let (a, b) = self.profile;
        let _ = write!(out, ",\"profile\":\"{a}/{b}\",\"type\":");
        push_str(out, self.hd_type);
        out.push('}');
    }
}

fn push_str(out: &mut String, text: &str) {
    // serde_json's escaping is fixed by the JSON spec: the same text, the same bytes.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

fn push_joined<T>(out: &mut String, items: &[T], mut push: impl FnMut(&mut String, &T)) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push(out, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<CanonicalProfile, ProfileError> {
        ProfileInput::from_json(json.as_bytes())?.canonicalize(QuantizationStep::DEFAULT)
    }

    fn field_of(json: &str) -> String {
        parse(json).expect_err("should be rejected").field
    }

    const HD: &str = r#""hdData":{"type":"Generator","authority":"Sacral","profile":"2/4"}"#;

    #[test]
    fn names_are_trimmed_collapsed_and_title_cased() {
        assert_eq!(
            normalize_name("  alpha   CENTAURI "),
            Ok("Alpha Centauri".into())
        );
        assert_eq!(normalize_name("zeta-reticuli"), Ok("Zeta-Reticuli".into()));
        assert_eq!(normalize_name("\t"), Err("must not be empty".into()));
        assert!(normalize_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases = [
            (r#"{}"#, "classification"),
            (r#"{"classification":"solo"}"#, "classification"),
            (
                &format!(r#"{{"classification":"primary",{HD}}}"#),
                "percentages",
            ),
            (
                &format!(r#"{{"classification":"primary","percentages":{{"Sirius":100}},{HD}}}"#),
                "primary",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Vega","percentages":{{"Sirius":100}},{HD}}}"#
                ),
                "primary",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":90}},{HD}}}"#
                ),
                "percentages",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":101, "Vega":-1}},{HD}}}"#
                ),
                "percentages.Sirius",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":50,"SIRIUS ":50}},{HD}}}"#
                ),
                "percentages.SIRIUS ",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":"lots"}},{HD}}}"#
                ),
                "percentages.Sirius",
            ),
            (
                &format!(
                    r#"{{"classification":"hybrid","hybrid":["Sirius"],"percentages":{{"Sirius":100}},{HD}}}"#
                ),
                "hybrid",
            ),
            (
                &format!(
                    r#"{{"classification":"hybrid","hybrid":["Sirius","sirius"],"percentages":{{"Sirius":100}},{HD}}}"#
                ),
                "hybrid[1]",
            ),
            (
                &format!(
                    r#"{{"classification":"hybrid","hybrid":["Sirius","Vega"],"percentages":{{"Sirius":100}},{HD}}}"#
                ),
                "hybrid[1]",
            ),
            (
                r#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100}}"#,
                "hdData",
            ),
            (
                r#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100},"hdData":{"authority":"Sacral","profile":"2/4"}}"#,
                "hdData.type",
            ),
            (
                r#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100},"hdData":{"type":"Generator","authority":"Sacral","profile":"7/9"}}"#,
                "hdData.profile",
            ),
            (
                r#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100},"hdData":{"type":"Generator","authority":"Sacral","profile":"2/4","gates":[1,99]}}"#,
                "hdData.gates[1]",
            ),
            (
                &format!(
                    r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":100}},{HD},"birthDate":"1990-01-01"}}"#
                ),
                "birthDate",
            ),
            (
                r#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":100},"hdData":{"type":"Generator","authority":"Sacral","profile":"2/4","birthTime":"12:00"}}"#,
                "hdData.birthTime",
            ),
            (r#"{"classification":"primary""#, "body"),
            (r#"{"classification": "#, "body"),
            (r#"[1, 2]"#, "body"),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(json), field, "for {json}");
        }
    }

    #[test]
    fn sum_tolerance_applies_to_values_as_sent() {
        let at = |a: f64, b: f64| {
            parse(&format!(
                r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":{a},"Vega":{b}}},{HD}}}"#
            ))
        };
        assert!(at(60.0, 41.0).is_ok());
        assert!(at(59.0, 40.0).is_ok());
        assert!(at(60.0, 41.5).is_err());
        assert!(at(58.0, 40.5).is_err());
    }

    #[test]
    fn a_canonical_form_reads_back_even_when_flooring_took_two_points() {
        let sent = format!(
            r#"{{"classification":"primary","primary":"Sirius","percentages":{{"Sirius":25.9,"Lyra":25.9,"Vega":25.9,"Orion":22.3}},{HD}}}"#
        );
        let profile = parse(&sent).expect("sums to 100 as sent");
        let canonical = profile.to_json();
        assert!(canonical.contains(r#""Sirius":25.5"#), "{canonical}");
        assert_eq!(CanonicalProfile::from_json(&canonical), Ok(profile.clone()));
        let reformatted: serde_json::Value = serde_json::from_str(&canonical).unwrap();
        let pretty = serde_json::to_string_pretty(&reformatted).unwrap();
        assert_eq!(
            CanonicalProfile::requantize(&pretty, QuantizationStep::DEFAULT),
            Ok(profile)
        );
        let coarser: QuantizationStep = "1".parse().unwrap();
        let one = CanonicalProfile::requantize(&pretty, coarser).unwrap();
        assert!(
            one.to_json().contains(r#""Sirius":25,"#),
            "{}",
            one.to_json()
        );
    }

    #[test]
    fn primary_system_of_a_hybrid_is_its_largest_member() {
        let profile = parse(&format!(
            r#"{{"classification":"hybrid","hybrid":["Sirius","Lyra"],"percentages":{{"Sirius":30,"Lyra":60,"Orion":10}},{HD}}}"#
        ))
        .expect("valid");
        assert_eq!(profile.primary_system(), "Lyra");
    }
}
