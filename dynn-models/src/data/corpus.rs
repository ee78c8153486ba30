//! An English-like text corpus generated from a small grammar, so the language-model trainers
//! run with no download; or a text file when one is given.
//!
//! The grammar has regularities a tiny model can learn: subject–verb agreement (also across a
//! relative clause), irregular plurals, pronouns that agree with a named character, numbers
//! that agree with their noun, fixed phrases, and day/number sequences.

use std::path::Path;

use dynn_core::{Error, Result};

use crate::rng::Rng;

/// A noun: singular and plural forms.
type Noun = (&'static str, &'static str);
/// A verb: third-person singular, plural, and past forms.
type Verb = (&'static str, &'static str, &'static str);

const NOUNS: &[Noun] = &[
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("child", "children"),
    ("mouse", "mice"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("king", "kings"),
    ("queen", "queens"),
    ("fox", "foxes"),
    ("horse", "horses"),
    ("sailor", "sailors"),
    ("robot", "robots"),
    ("wolf", "wolves"),
];
const THINGS: &[Noun] = &[
    ("apple", "apples"),
    ("book", "books"),
    ("ball", "balls"),
    ("letter", "letters"),
    ("box", "boxes"),
    ("song", "songs"),
    ("river", "rivers"),
    ("house", "houses"),
    ("stone", "stones"),
    ("key", "keys"),
];
const VERBS: &[Verb] = &[
    ("sees", "see", "saw"),
    ("chases", "chase", "chased"),
    ("likes", "like", "liked"),
    ("finds", "find", "found"),
    ("carries", "carry", "carried"),
    ("watches", "watch", "watched"),
    ("has", "have", "had"),
    ("takes", "take", "took"),
    ("follows", "follow", "followed"),
];
const INTRANSITIVE: &[Verb] = &[
    ("sleeps", "sleep", "slept"),
    ("runs", "run", "ran"),
    ("sings", "sing", "sang"),
    ("waits", "wait", "waited"),
    ("laughs", "laugh", "laughed"),
];
const ADJECTIVES: &[&str] = &[
    "big", "small", "old", "young", "red", "green", "happy", "quiet", "clever", "tired",
];
const PLACES: &[&str] = &[
    "the forest",
    "the village",
    "the old castle",
    "the market",
    "the river bank",
    "the garden",
];
/// Named characters with their subject and object pronouns.
const NAMES: &[(&str, &str, &str)] = &[
    ("Anna", "she", "her"),
    ("Tom", "he", "him"),
    ("Maria", "she", "her"),
    ("Peter", "he", "him"),
    ("Lena", "she", "her"),
    ("Max", "he", "him"),
];
const DAYS: &[&str] = &[
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const NUMBERS: &[&str] = &[
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];
const OPENERS: &[&str] = &[
    "Once upon a time",
    "Early in the morning",
    "Late at night",
    "A long time ago",
];

/// A deterministic English-like corpus of about `bytes` bytes (slightly more: it ends on a
/// whole sentence). Paragraphs are separated by newlines.
pub fn generated_corpus(seed: u64, bytes: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        paragraph(&mut rng, &mut out);
        out.push('\n');
    }
    out
}

/// The text of the file at `path`, or `generated_corpus(seed, 400_000)` when `path` is
/// `None`. Errors name the path when the file cannot be read, is not UTF-8, or is empty.
pub fn load_corpus(path: Option<&Path>, seed: u64) -> Result<String> {
    let Some(path) = path else {
        return Ok(generated_corpus(seed, 400_000));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Msg(format!("load_corpus: cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(Error::Msg(format!(
            "load_corpus: {} is empty",
            path.display()
        )));
    }
    Ok(text)
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.range(0, items.len())]
}

/// One paragraph: a story opener about a named character, then 3 to 6 sentences.
fn paragraph(rng: &mut Rng, out: &mut String) {
    let (name, he, him) = pick(rng, NAMES);
    let mut sentences = vec![format!(
        "{}, {name} lived near {}.",
        pick(rng, OPENERS),
        pick(rng, PLACES)
    )];
    for _ in 0..rng.range(3, 7) {
        let s = match rng.range(0, 9) {
            0 | 1 => simple(rng),
            2 => relative(rng),
            3 => character(rng, name, he, him),
            4 => counting(rng),
            5 => days(rng),
            6 => question(rng),
            7 => intransitive(rng),
            _ => fixed_phrase(rng, name),
        };
        sentences.push(s);
    }
    for (i, s) in sentences.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&capitalize(s));
    }
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A noun phrase over `nouns`: determiner, optional adjective, noun; and whether it is plural.
fn noun_phrase(rng: &mut Rng, nouns: &[Noun]) -> (String, bool) {
    let (sing, plur) = pick(rng, nouns);
    let plural = rng.bernoulli(0.4);
    let det = if plural {
        pick(rng, &["the", "some", "many", "the"])
    } else {
        pick(rng, &["the", "a", "this", "the"])
    };
    let noun = if plural { plur } else { sing };
    let mut s = String::from(det);
    if rng.bernoulli(0.4) {
        let adj = pick(rng, ADJECTIVES);
        if det == "a" && adj.starts_with(['a', 'e', 'i', 'o', 'u']) {
            s.push('n');
        }
        s.push(' ');
        s.push_str(adj);
    }
    s.push(' ');
    s.push_str(noun);
    (s, plural)
}

/// The verb form agreeing with the subject (present) or the past form.
fn conjugate(verb: Verb, plural: bool, past: bool) -> &'static str {
    match (past, plural) {
        (true, _) => verb.2,
        (false, false) => verb.0,
        (false, true) => verb.1,
    }
}

fn simple(rng: &mut Rng) -> String {
    let (subj, plural) = noun_phrase(rng, NOUNS);
    let verb = conjugate(pick(rng, VERBS), plural, rng.bernoulli(0.3));
    let (obj, _) = noun_phrase(rng, THINGS);
    if rng.bernoulli(0.3) {
        format!("{subj} {verb} {obj} in {}.", pick(rng, PLACES))
    } else {
        format!("{subj} {verb} {obj}.")
    }
}

/// Agreement across a relative clause: "the dogs that chase the cat are happy".
fn relative(rng: &mut Rng) -> String {
    let (subj, plural) = noun_phrase(rng, NOUNS);
    let inner = conjugate(pick(rng, VERBS), plural, false);
    let (obj, _) = noun_phrase(rng, NOUNS);
    let be = if plural { "are" } else { "is" };
    format!("{subj} that {inner} {obj} {be} {}.", pick(rng, ADJECTIVES))
}

/// Pronouns agreeing with the paragraph's character.
fn character(rng: &mut Rng, name: &str, he: &str, him: &str) -> String {
    let (thing, _) = noun_phrase(rng, THINGS);
    match rng.range(0, 3) {
        0 => format!(
            "{name} {} {thing} because {he} was {}.",
            conjugate(pick(rng, VERBS), false, true),
            pick(rng, ADJECTIVES)
        ),
        1 => format!("the {} gave {him} {thing}.", pick(rng, NOUNS).0),
        _ => format!(
            "{he} {} and then {he} went home.",
            pick(rng, INTRANSITIVE).2
        ),
    }
}

/// Number agreement: "there is one apple" / "there are three apples".
fn counting(rng: &mut Rng) -> String {
    let (sing, plur) = pick(rng, THINGS);
    let n = rng.range(0, NUMBERS.len());
    if n == 0 {
        format!("there is one {sing} in {}.", pick(rng, PLACES))
    } else {
        format!("there are {} {plur} in {}.", NUMBERS[n], pick(rng, PLACES))
    }
}

/// Sequences: "after monday comes tuesday".
fn days(rng: &mut Rng) -> String {
    let d = rng.range(0, DAYS.len());
    if rng.bernoulli(0.5) {
        format!("after {} comes {}.", DAYS[d], DAYS[(d + 1) % DAYS.len()])
    } else {
        let n = rng.range(0, NUMBERS.len() - 1);
        format!("{} plus one is {}.", NUMBERS[n], NUMBERS[n + 1])
    }
}

/// Agreement in questions: "does the cat see ...?" / "do the cats see ...?".
fn question(rng: &mut Rng) -> String {
    let (subj, plural) = noun_phrase(rng, NOUNS);
    let aux = if plural { "do" } else { "does" };
    let verb = pick(rng, VERBS).1;
    let (obj, _) = noun_phrase(rng, THINGS);
    format!("{aux} {subj} {verb} {obj}?")
}

fn intransitive(rng: &mut Rng) -> String {
    let (subj, plural) = noun_phrase(rng, NOUNS);
    let verb = conjugate(pick(rng, INTRANSITIVE), plural, rng.bernoulli(0.3));
    format!("{subj} {verb} in {}.", pick(rng, PLACES))
}

fn fixed_phrase(rng: &mut Rng, name: &str) -> String {
    match rng.range(0, 3) {
        0 => format!("and so {name} lived happily ever after."),
        1 => format!(
            "as a matter of fact, {name} knew the way to {}.",
            pick(rng, PLACES)
        ),
        _ => format!("all of a sudden, {} appeared.", noun_phrase(rng, NOUNS).0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let a = generated_corpus(7, 20_000);
        assert_eq!(a, generated_corpus(7, 20_000));
        assert_ne!(a, generated_corpus(8, 20_000));
        assert!(a.len() >= 20_000 && a.len() < 21_000, "{}", a.len());
        assert!(a.is_ascii());
        assert!(generated_corpus(1, 0).is_empty());
    }

    #[test]
    fn has_agreement() {
        let text = generated_corpus(3, 50_000);
        assert!(text.contains("the cats ") || text.contains("some cats "));
        assert!(!text.contains(" is two ") && !text.contains("there is three"));
        assert!(!text.contains("cats sees") && !text.contains("dogs has"));
    }

    #[test]
    fn load_errors_name_the_path() {
        let missing = std::env::temp_dir().join("dynn-no-such-corpus-3141.txt");
        let err = load_corpus(Some(&missing), 0).unwrap_err().to_string();
        assert!(err.contains("dynn-no-such-corpus-3141.txt"), "{err}");
        let empty = std::env::temp_dir().join(format!("dynn-empty-{}.txt", std::process::id()));
        std::fs::write(&empty, "  \n").unwrap();
        let err = load_corpus(Some(&empty), 0).unwrap_err().to_string();
        std::fs::remove_file(&empty).unwrap();
        assert!(err.contains("empty"), "{err}");
        assert_eq!(load_corpus(None, 5).unwrap(), generated_corpus(5, 400_000));
    }
}
