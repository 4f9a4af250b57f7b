//! The size of a GraphQL document, bounded before async-graphql looks at it.
//!
//! async-graphql's own checks walk a document with its fragments expanded and
//! without memory of what they walked: a "fragment bomb" (each fragment
//! spreading the one before twice) makes that walk exponential in the
//! document's length, before any limit is checked. This walk is linear: it
//! counts each fragment's expanded size once, stops as soon as the total passes
//! the limit, and refuses fragments that spread themselves. Every fragment
//! definition counts, used or not (validation walks them all), their number
//! and how deeply spreads chain are capped, and the text's nesting is checked
//! first, so neither this walk nor the parser's nor validation's recursion
//! can be driven deep.

use std::collections::HashMap;

use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::parser::{Positioned, parse_query};
use async_graphql::{Name, Pos};

/// Field selections a document may hold once its fragments are expanded. A
/// portal page or a full webhook listing selects well under a hundred.
pub const MAX_EXPANDED_FIELDS: usize = 2_000;

/// How deeply brackets of any kind may nest in the text (selection sets,
/// lists and objects in arguments): a little above the schema's depth limit,
/// and well within what the parser recurses through safely.
pub const MAX_NESTING: usize = 48;

/// Fragment definitions a document may hold.
pub const MAX_FRAGMENTS: usize = 100;

/// How many fragments a chain of spreads may pass through (`...A` spreading
/// `...B` spreading `...C` is three).
pub const MAX_SPREAD_DEPTH: usize = 16;

/// Why a document is refused before execution; the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// Refuses a document whose nesting or expanded size passes the limits.
/// Documents that do not parse are let through: async-graphql reports their
/// syntax errors with positions.
pub fn check(query: &str) -> Result<(), Refused> {
    check_nesting(query)?;
    let Ok(document) = parse_query(query) else {
        return Ok(());
    };
    if document.fragments.len() > MAX_FRAGMENTS {
        return Err(Refused(format!(
            "the query defines {} fragments; at most {MAX_FRAGMENTS} are allowed",
            document.fragments.len()
        )));
    }
    let mut walk = Walk {
        document: &document,
        expanded: HashMap::new(),
        in_progress: Vec::new(),
    };
    let mut total = 0usize;
    for (_, operation) in document.operations.iter() {
        total = total.saturating_add(walk.selection_set(&operation.node.selection_set)?.size);
        if total > MAX_EXPANDED_FIELDS {
            return Err(too_large());
        }
    }
    // Unused fragments too: validation walks every definition.
    for (name, fragment) in &document.fragments {
        total = total.saturating_add(walk.fragment(name, fragment.pos)?.size);
        if total > MAX_EXPANDED_FIELDS {
            return Err(too_large());
        }
    }
    Ok(())
}

/// What a selection set or a fragment expands to.
#[derive(Debug, Clone, Copy, Default)]
struct Expanded {
    /// Fields, once every spread is expanded.
    size: usize,
    /// The longest chain of fragments its spreads pass through.
    spread_depth: usize,
}

fn too_deep() -> Refused {
    Refused(format!(
        "fragment spreads chain through more than {MAX_SPREAD_DEPTH} fragments"
    ))
}

fn too_large() -> Refused {
    Refused(format!(
        "the query selects more than {MAX_EXPANDED_FIELDS} fields once its fragments are expanded; ask for less"
    ))
}

/// Bracket depth outside strings and comments, in one pass over the text.
fn check_nesting(query: &str) -> Result<(), Refused> {
    let mut depth = 0usize;
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '[' | '(' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(Refused(format!(
                        "the query nests brackets more than {MAX_NESTING} deep"
                    )));
                }
            }
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' || c == '\r' {
                        break;
                    }
                }
            }
            '"' if chars.peek() == Some(&'"') => {
                chars.next();
                if chars.peek() == Some(&'"') {
                    // A block string: it ends at the next `"""` not escaped
                    // as `\"""`; lone quotes inside it are text.
                    chars.next();
                    let mut quotes = 0;
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' if quotes == 0 => {
                                // `\"""` is an escaped triple quote.
                                let mut ahead = chars.clone();
                                if ahead.next() == Some('"') && ahead.next() == Some('"') && ahead.next() == Some('"') {
                                    chars.next();
                                    chars.next();
                                    chars.next();
                                }
                            }
                            '"' => {
                                quotes += 1;
                                if quotes == 3 {
                                    break;
                                }
                            }
                            _ => quotes = 0,
                        }
                    }
                }
                // Otherwise `""`, an empty string.
            }
            '"' => {
                // A string ends at its closing quote or, unclosed, at the end
                // of the line (where the parser will refuse it).
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' | '\n' | '\r' => break,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

struct Walk<'a> {
    document: &'a ExecutableDocument,
    /// Each fragment's expansion, computed once. Its spread depth is kept
    /// with it: the definitions are walked in no particular order, and a
    /// long chain met from its end is walked in short pieces, each reusing
    /// the last, whose depths add up only here.
    expanded: HashMap<&'a Name, Expanded>,
    /// The chain of fragments being expanded now: meeting one of them again
    /// is a cycle; its length is the spread depth.
    in_progress: Vec<&'a Name>,
}

impl<'a> Walk<'a> {
    fn selection_set(&mut self, set: &'a Positioned<SelectionSet>) -> Result<Expanded, Refused> {
        let mut total = Expanded::default();
        for selection in &set.node.items {
            let expanded = match &selection.node {
                Selection::Field(field) => {
                    let inner = self.selection_set(&field.node.selection_set)?;
                    Expanded {
                        size: 1 + inner.size,
                        ..inner
                    }
                }
                Selection::InlineFragment(fragment) => self.selection_set(&fragment.node.selection_set)?,
                Selection::FragmentSpread(spread) => self.fragment(&spread.node.fragment_name.node, spread.pos)?,
            };
            total.size = total.size.saturating_add(expanded.size);
            total.spread_depth = total.spread_depth.max(expanded.spread_depth);
            if total.size > MAX_EXPANDED_FIELDS {
                return Err(too_large());
            }
        }
        Ok(total)
    }

    fn fragment(&mut self, name: &'a Name, pos: Pos) -> Result<Expanded, Refused> {
        if let Some(expanded) = self.expanded.get(name) {
            return Ok(*expanded);
        }
        // An unknown fragment is async-graphql's to report.
        let Some(fragment) = self.document.fragments.get(name) else {
            return Ok(Expanded::default());
        };
        if self.in_progress.contains(&name) {
            return Err(Refused(format!(
                "fragment `{name}` spreads itself (line {}, column {})",
                pos.line, pos.column
            )));
        }
        // Also bounds the recursion, whatever the memory says.
        if self.in_progress.len() >= MAX_SPREAD_DEPTH {
            return Err(too_deep());
        }
        self.in_progress.push(name);
        let inner = self.selection_set(&fragment.node.selection_set)?;
        self.in_progress.pop();
        let expanded = Expanded {
            spread_depth: inner.spread_depth + 1,
            ..inner
        };
        if expanded.spread_depth > MAX_SPREAD_DEPTH {
            return Err(too_deep());
        }
        self.expanded.insert(name, expanded);
        Ok(expanded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `levels` fragments, each spreading the one before twice: 2^levels
    /// fields once expanded, in a few hundred bytes.
    fn fragment_bomb(levels: usize) -> String {
        let mut query = format!("query {{ tenant {{ ...F{levels} }} }}\nfragment F0 on Tenant {{ id name }}\n");
        for level in 1..=levels {
            let before = level - 1;
            query.push_str(&format!(
                "fragment F{level} on Tenant {{ ...F{before} ...F{before} }}\n"
            ));
        }
        query
    }

    #[test]
    fn ordinary_queries_pass() {
        assert_eq!(check("{ tenant { id name } }"), Ok(()));
        assert_eq!(
            check(
                "query Q($first: Int) { webhooks(first: $first) { nodes { ...W } pageInfo { hasNextPage } } }
                 fragment W on Webhook { id url events active stats { succeeded failed } }"
            ),
            Ok(())
        );
        // Brackets in strings and comments do not count.
        let deep = "{".repeat(100);
        assert_eq!(check(&format!("# {deep}\n{{ tenant {{ id }} }}")), Ok(()));
        assert_eq!(check(&format!("{{ webhook(id: \"{deep}\\\"\") {{ id }} }}")), Ok(()));
        // Syntax errors are async-graphql's to report.
        assert_eq!(check("{ tenant { id "), Ok(()));
    }

    #[test]
    fn a_fragment_bomb_is_refused_in_linear_time() {
        // 2^15 fields expanded from 15 fragments: refused by the expanded size,
        // counted once per fragment.
        let refused = check(&fragment_bomb(15)).expect_err("refused");
        assert!(refused.0.contains("more than 2000 fields"), "{refused:?}");
        // 2^40: refused by the chain's depth before anything is expanded.
        let query = fragment_bomb(40);
        assert!(query.len() < 4_000, "{}", query.len());
        let started = std::time::Instant::now();
        let refused = check(&query).expect_err("refused");
        assert!(refused.0.contains("more than 16 fragments"), "{refused:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // A small one is fine: 2^5 = 32 fields.
        assert_eq!(check(&fragment_bomb(5)), Ok(()));
    }

    #[test]
    fn many_aliases_count_as_the_fields_they_are() {
        let alias = |n: usize| format!("a{n}: webhooks(first: 100) {{ nodes {{ stats {{ succeeded }} }} }}");
        let query = format!("{{ {} }}", (0..600).map(alias).collect::<Vec<_>>().join(" "));
        assert!(check(&query).is_err());
    }

    #[test]
    fn block_strings_and_unclosed_strings_do_not_hide_brackets() {
        let deep = "[".repeat(60);
        // A lone quote inside a block string is text, not a string's start.
        let query = format!("{{ webhook(id: \"\"\" \" \"\"\", x: {deep}) {{ id }} }}");
        assert!(check(&query).expect_err("refused").0.contains("48 deep"));
        // An escaped triple quote does not end the block string.
        let query = format!("{{ webhook(id: \"\"\" \\\"\"\" {deep} \"\"\") {{ id }} }}");
        assert_eq!(check(&query), Ok(()));
        // An unclosed string ends at its line.
        let query = format!("{{ webhook(id: \"open\n x: {deep}) {{ id }} }}");
        assert!(check(&query).is_err());
        // The empty string is two quotes, nothing more.
        let query = format!("{{ webhook(id: \"\", x: {deep}) {{ id }} }}");
        assert!(check(&query).is_err());
    }

    #[test]
    fn unused_fragments_many_fragments_and_long_spread_chains_are_refused() {
        // A chain of unused fragments: validation would walk it all.
        let mut query = String::from("{ __typename }\n");
        for i in 0..60 {
            query.push_str(&format!("fragment f{i} on Query {{ ...f{} }}\n", i + 1));
        }
        query.push_str("fragment f60 on Query { __typename }\n");
        // The definitions are walked in a hash map's order, new for every
        // parse: whichever end of the chain comes first, it is refused.
        for _ in 0..50 {
            let refused = check(&query).expect_err("refused");
            assert!(refused.0.contains("more than 16 fragments"), "{refused:?}");
        }
        // Sixteen fragments in a chain are allowed, in any order.
        let mut query = String::from("{ ...f0 }\n");
        for i in 0..15 {
            query.push_str(&format!("fragment f{i} on Query {{ ...f{} }}\n", i + 1));
        }
        query.push_str("fragment f15 on Query { __typename }\n");
        for _ in 0..50 {
            assert_eq!(check(&query), Ok(()));
        }

        let mut query = String::from("{ __typename }\n");
        for i in 0..101 {
            query.push_str(&format!("fragment f{i} on Query {{ __typename }}\n"));
        }
        let refused = check(&query).expect_err("refused");
        assert!(refused.0.contains("at most 100"), "{refused:?}");

        // Unused but large: counted.
        let fields: String = (0..2100).map(|i| format!(" a{i}: __typename")).collect();
        let query = format!("{{ __typename }}\nfragment big on Query {{{fields} }}\n");
        assert!(check(&query).is_err());
    }

    #[test]
    fn cycles_and_deep_nesting_are_refused() {
        let cycle = "{ tenant { ...A } } fragment A on Tenant { id ...B } fragment B on Tenant { ...A }";
        let refused = check(cycle).expect_err("refused");
        assert!(refused.0.contains("spreads itself"), "{refused:?}");

        let deep = format!("{}{}", "{ tenant ".repeat(200), "}".repeat(200));
        let refused = check(&deep).expect_err("refused");
        assert!(refused.0.contains("more than 48 deep"), "{refused:?}");
        // Nesting alone, with no parsable document: still refused before parsing.
        assert!(check(&"[".repeat(1_000_000)).is_err());
    }
}
