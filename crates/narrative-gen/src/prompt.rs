//! The prompt: a template file kept beside the code, rendered from the canonical
//! profile. Its text, the model and the generation parameters make up `promptHash`,
//! so changing any of them moves every request to new cache keys.

use cache_core::{CanonicalProfile, PromptHash};

/// The prompt template, part of `promptHash`.
pub const TEMPLATE: &str = include_str!("../prompts/narrative.txt");

/// Everything besides the template that changes what the LLM writes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub model: String,
    pub temperature: f32,
    pub max_tokens: u32,
}

impl GenerationParams {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            temperature: 0.7,
            max_tokens: 700,
        }
    }

    /// `promptHash` for this template and these parameters.
    pub fn prompt_hash(&self, template: &str) -> PromptHash {
        PromptHash::of_parts(&[
            ("template", template.as_bytes()),
            ("model", self.model.as_bytes()),
            ("temperature", self.temperature.to_string().as_bytes()),
            ("max_tokens", self.max_tokens.to_string().as_bytes()),
        ])
    }
}

/// Fills the template's `{{placeholders}}` from the profile.
pub fn render(template: &str, profile: &CanonicalProfile) -> String {
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "none given".to_owned()
        } else {
            items.join(", ")
        }
    };
    let hd = &profile.hd;
    let systems = profile
        .percentages
        .iter()
        .map(|(name, share)| format!("{name} {share}%"))
        .collect();
    let lead = if profile.hybrid.is_empty() {
        profile.primary_system().to_owned()
    } else {
        format!("the hybrid of {}", profile.hybrid.join(" and "))
    };
    template
        .replace("{{lead}}", &lead)
        .replace("{{classification}}", profile.classification.as_str())
        .replace("{{systems}}", &list(systems))
        .replace("{{type}}", hd.hd_type)
        .replace("{{authority}}", hd.authority)
        .replace("{{profile}}", &format!("{}/{}", hd.profile.0, hd.profile.1))
        .replace("{{definition}}", hd.definition.unwrap_or("not given"))
        .replace(
            "{{centers}}",
            &list(hd.centers.iter().map(|c| (*c).to_owned()).collect()),
        )
        .replace(
            "{{channels}}",
            &list(
                hd.channels
                    .iter()
                    .map(|(a, b)| format!("{a}-{b}"))
                    .collect(),
            ),
        )
        .replace(
            "{{gates}}",
            &list(hd.gates.iter().map(u8::to_string).collect()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::{ProfileInput, QuantizationStep};

    #[test]
    fn renders_every_placeholder() {
        let input = ProfileInput::from_json(
            br#"{"classification":"primary","primary":"Sirius","percentages":{"Sirius":70,"Lyra":30},
                "hdData":{"type":"Projector","authority":"Splenic","profile":"5/1","gates":[7]}}"#,
        )
        .expect("parses");
        let profile = input
            .canonicalize(QuantizationStep::DEFAULT)
            .expect("valid");
        let prompt = render(TEMPLATE, &profile);
        assert!(!prompt.contains("{{"), "{prompt}");
        assert!(
            prompt.contains("Sirius 70%, ") || prompt.contains("Lyra 30%, Sirius 70%"),
            "{prompt}"
        );
        assert!(
            prompt.contains("Projector") && prompt.contains("5/1") && prompt.contains("Gates: 7")
        );
    }

    #[test]
    fn hash_covers_template_model_and_parameters() {
        let params = GenerationParams::new("gpt-4o-mini");
        let base = params.prompt_hash(TEMPLATE);
        assert_ne!(base, params.prompt_hash("another template"));
        assert_ne!(base, GenerationParams::new("gpt-4o").prompt_hash(TEMPLATE));
        assert_ne!(
            base,
            GenerationParams {
                temperature: 0.2,
                ..params.clone()
            }
            .prompt_hash(TEMPLATE)
        );
        assert_ne!(
            base,
            GenerationParams {
                max_tokens: 900,
                ..params.clone()
            }
            .prompt_hash(TEMPLATE)
        );
        assert_eq!(base, params.prompt_hash(TEMPLATE));
    }
}
