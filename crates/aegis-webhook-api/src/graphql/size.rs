//! The size of a GraphQL document, bounded before async-graphql looks at it.
//!
//! async-graphql's own checks walk a document with its fragments expanded and
//! without memory of what they walked: a "fragment bomb" (each fragment
//! spreading the one before twice) makes that walk exponential in the
//! document's length, before any limit is checked. This walk is linear: it
//! counts each fragment's expanded size once, stops as soon as the total passes
//! the limit, and refuses fragments that spread themselves. It runs on the
//! text's nesting first, so no parser recursion can be driven deep.

use std::collections::{HashMap, HashSet};

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
    let mut walk = Walk {
        document: &document,
        expanded: HashMap::new(),
        in_progress: HashSet::new(),
    };
    let mut total = 0usize;
    for (_, operation) in document.operations.iter() {
        total = total.saturating_add(walk.selection_set(&operation.node.selection_set)?);
        if total > MAX_EXPANDED_FIELDS {
            return Err(too_large());
        }
    }
    Ok(())
}

fn too_large() -> Refused {
    Refused(format!(
        "the query selects more than {MAX_EXPANDED_FIELDS} fields once its fragments are expanded; ask for less"
    ))
}

/// Bracket depth outside strings and comments, in one pass over the text.
fn check_nesting(query: &str) -> Result<(), Refused> {
    let mut depth = 0usize;
    let mut chars = query.chars();
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
            '"' => {
                // Brackets inside strings do not nest; escapes are skipped
                // whole. (A block string's quotes pair up the same way.)
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
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
    /// Each fragment's expanded size, computed once.
    expanded: HashMap<&'a Name, usize>,
    /// The fragments being expanded now: meeting one again is a cycle.
    in_progress: HashSet<&'a Name>,
}

impl<'a> Walk<'a> {
    fn selection_set(&mut self, set: &'a Positioned<SelectionSet>) -> Result<usize, Refused> {
        let mut total = 0usize;
        for selection in &set.node.items {
            let size = match &selection.node {
                Selection::Field(field) => 1 + self.selection_set(&field.node.selection_set)?,
                Selection::InlineFragment(fragment) => self.selection_set(&fragment.node.selection_set)?,
                Selection::FragmentSpread(spread) => self.fragment(&spread.node.fragment_name.node, spread.pos)?,
            };
            total = total.saturating_add(size);
            if total > MAX_EXPANDED_FIELDS {
                return Err(too_large());
            }
        }
        Ok(total)
    }

    fn fragment(&mut self, name: &'a Name, pos: Pos) -> Result<usize, Refused> {
        if let Some(size) = self.expanded.get(name) {
            return Ok(*size);
        }
        // An unknown fragment is async-graphql's to report.
        let Some(fragment) = self.document.fragments.get(name) else {
            return Ok(0);
        };
        if !self.in_progress.insert(name) {
            return Err(Refused(format!(
                "fragment `{name}` spreads itself (line {}, column {})",
                pos.line, pos.column
            )));
        }
        let size = self.selection_set(&fragment.node.selection_set)?;
        self.in_progress.remove(name);
        self.expanded.insert(name, size);
        Ok(size)
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
        // 2^40 fields expanded: counting them one by one would never end.
        let query = fragment_bomb(40);
        assert!(query.len() < 4_000, "{}", query.len());
        let started = std::time::Instant::now();
        let refused = check(&query).expect_err("refused");
        assert!(refused.0.contains("more than 2000 fields"), "{refused:?}");
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
