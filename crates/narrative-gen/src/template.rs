//! The template engine: a complete, readable narrative written from the profile
//! without an LLM. It answers while the LLM is slow or failing (`source: fallback`),
//! and is the generator itself when no `LLM_API_KEY` is configured. The same profile
//! always gives the same text.

use cache_core::{CanonicalProfile, Thousandths};

/// The model name recorded for narratives the template engine wrote.
pub const TEMPLATE_MODEL: &str = "template@1";

/// `(system, what it brings)` for the star systems the app knows best.
const SYSTEMS: &[(&str, &str)] = &[
    ("Pleiades", "a gift for nurturing, emotional attunement and bringing people into harmony"),
    ("Sirius", "a drive toward mastery, hidden knowledge and the patient work of transformation"),
    ("Arcturus", "a healer's clarity, an eye for better systems and a pull toward what comes next"),
    ("Lyra", "an old, creative fire: courage, artistry and the instinct to begin things"),
    ("Orion", "a seeker's intensity, a love of hard questions and the resolve to integrate light and shadow"),
    ("Andromeda", "a longing for freedom, wide perspective and a dislike of needless rules"),
    ("Vega", "bold self-expression, a pioneering spirit and a talent for turning ideas into form"),
    ("Alpha Centauri", "inventiveness, technical curiosity and a practical approach to big ideas"),
    ("Tau Ceti", "a bridge-builder's diplomacy and a talent for translating between worlds"),
    ("Zeta Reticuli", "calm analysis, precision and a steady devotion to understanding how things work"),
    ("Polaris", "steadiness, a sense of direction and a way of orienting others"),
    ("Procyon", "adaptability, resourcefulness and an ease with change"),
    ("Antares", "passion, loyalty and the courage to stand for what matters"),
];

fn gift_of(system: &str) -> String {
    SYSTEMS
        .iter()
        .find(|(name, _)| *name == system)
        .map(|(_, gift)| (*gift).to_owned())
        .unwrap_or_else(|| {
            format!("the particular wisdom of {system}, which you are still discovering")
        })
}

fn strategy_of(hd_type: &str) -> &'static str {
    match hd_type {
        "Generator" => "As a Generator your strategy is to respond: your energy is strongest when you commit to what your gut lights up for, rather than what you think you should start",
        "Manifesting Generator" => "As a Manifesting Generator you respond first and then inform: you move fast and in many directions, and things go smoothly when you tell the people around you before you leap",
        "Manifestor" => "As a Manifestor your strategy is to inform: you are here to initiate, and letting others know what you are about to do turns resistance into support",
        "Projector" => "As a Projector your strategy is to wait for the invitation: your insight into others is your gift, and it lands best when it has been asked for",
        "Reflector" => "As a Reflector you take your time: waiting a full lunar cycle before big decisions lets you mirror your community with clarity rather than absorbing its noise",
        _ => "Your Human Design type asks you to move at your own pace",
    }
}

fn authority_of(authority: &str) -> &'static str {
    match authority {
        "Emotional" => "your emotional authority asks you to ride out your wave: clarity comes with time, not in the heat of the moment",
        "Sacral" => "your sacral authority speaks in the moment, as a felt yes or no in the body, before the mind has a chance to argue",
        "Splenic" => "your splenic authority is a quiet, instant knowing; it speaks once, so it pays to listen the first time",
        "Ego" => "your ego authority asks what you truly want and are willing to commit your will to",
        "Self-Projected" => "your self-projected authority becomes clear when you hear yourself talk things through with someone you trust",
        "Mental" => "your mental authority works through sounding boards and the right environments, not through deciding alone",
        "Lunar" => "your lunar authority unfolds over a full cycle of the moon, letting every side of a decision show itself",
        _ => "your inner authority is your most reliable guide",
    }
}

/// The reflection's advice, in the authority's own terms.
fn pause_for(authority: &str) -> &'static str {
    match authority {
        "Emotional" => "sleep on it and let your feelings settle",
        "Sacral" => "ask yourself a yes-or-no question and listen for the gut sound",
        "Splenic" => "notice your very first instinct",
        "Ego" => "ask whether your heart is really in it",
        "Self-Projected" => "talk it through out loud with someone you trust",
        "Mental" => "describe it to a good sounding board in a place where you feel at ease",
        "Lunar" => "give it time and revisit it over several weeks",
        _ => "pause and check in with yourself",
    }
}

fn line_of(line: u8) -> &'static str {
    match line {
        1 => "the investigator who needs a solid foundation",
        2 => "the natural talent who needs time alone",
        3 => "the experimenter who learns by trial and error",
        4 => "the networker whose opportunities come through friends",
        5 => "the problem-solver others project their hopes onto",
        6 => "the role model who grows into wisdom over time",
        _ => "a line of your own",
    }
}

fn share(profile: &CanonicalProfile, system: &str) -> Option<Thousandths> {
    profile
        .percentages
        .iter()
        .find(|(name, _)| name == system)
        .map(|(_, share)| *share)
}

/// Writes the narrative for a profile.
pub fn render(profile: &CanonicalProfile) -> String {
    let lead = profile.primary_system();
    let hd = &profile.hd;

    let opening = if profile.hybrid.is_empty() {
        let share = share(profile, lead)
            .map(|s| format!(" ({s}% of your blend)"))
            .unwrap_or_default();
        format!(
            "Your strongest thread runs back to {lead}{share}. It gives you {}.",
            gift_of(lead)
        )
    } else {
        let members: Vec<String> = profile
            .hybrid
            .iter()
            .map(|name| match share(profile, name) {
                Some(s) => format!("{name} ({s}%)"),
                None => name.clone(),
            })
            .collect();
        format!(
            "You carry a hybrid heritage of {}. With {lead} in the lead, it gives you {}; the others keep that gift from ever becoming one-note.",
            join_words(&members),
            gift_of(lead)
        )
    };

    let others: Vec<&(String, Thousandths)> = profile
        .percentages
        .iter()
        .filter(|(name, _)| name != lead && !profile.hybrid.contains(name))
        .collect();
    let colour = if others.is_empty() {
        "Your blend is concentrated rather than scattered, which tends to make your path feel unusually clear once you trust it.".to_owned()
    } else {
        let parts: Vec<String> = others
            .iter()
            .map(|(name, s)| format!("{name} ({s}%) adds {}", gift_of(name)))
            .collect();
        format!("Around that core, {}.", join_words(&parts))
    };

    let (personality, design) = hd.profile;
    let definition = hd.definition.map(|d| format!(" Your {} definition", d.to_lowercase())).map_or_else(String::new, |d| {
        format!("{d} shapes how you process the world: notice where you feel whole on your own and where you look to others to complete a circuit.")
    });
    let design_paragraph = format!(
        "{}. In practice, {}. Your {personality}/{design} profile pairs {} with {}, which is where your star heritage meets everyday life.{definition}",
        strategy_of(hd.hd_type),
        authority_of(hd.authority),
        line_of(personality),
        line_of(design),
    );

    let reflection = format!(
        "This week, try one small experiment: when a choice comes up, {} before you act, and notice how the {lead} part of you responds.",
        pause_for(hd.authority)
    );

    [opening, colour, design_paragraph, reflection].join("\n\n")
}

fn join_words(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::{ProfileInput, QuantizationStep};

    fn profile(json: &str) -> CanonicalProfile {
        ProfileInput::from_json(json.as_bytes())
            .expect("parses")
            .canonicalize(QuantizationStep::DEFAULT)
            .expect("valid")
    }

    #[test]
    fn writes_a_narrative_about_this_profile() {
        let p = profile(
            r#"{"classification":"primary","primary":"Pleiades","percentages":{"Pleiades":60,"Sirius":25,"Nova Prime":15},
               "hdData":{"type":"Manifesting Generator","authority":"Emotional","profile":"3/5","definition":"Split"}}"#,
        );
        let text = render(&p);
        for expected in [
            "Pleiades (60%",
            "Sirius (25%)",
            "Nova Prime",
            "Manifesting Generator",
            "3/5",
            "ride out your wave",
            "split definition",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(text.split("\n\n").count(), 4, "four paragraphs");
        assert!(
            text.split_whitespace().count() > 120,
            "a real narrative, not a line"
        );
        assert_eq!(text, render(&p), "deterministic");
    }

    #[test]
    fn hybrids_lead_with_their_largest_member() {
        let p = profile(
            r#"{"classification":"hybrid","hybrid":["Sirius","Lyra"],"percentages":{"Sirius":30,"Lyra":70},
               "hdData":{"type":"Reflector","authority":"Lunar","profile":"6/2"}}"#,
        );
        let text = render(&p);
        assert!(
            text.contains("hybrid heritage of Lyra (70%) and Sirius (30%)"),
            "{text}"
        );
        assert!(text.contains("With Lyra in the lead"), "{text}");
    }
}
