//! Maps key paths (`sites[1].routes[0].path`) to where they stand in the YAML source.
//!
//! Serde gives us typed values but forgets positions, and `serde_ignored` reports unknown keys
//! by path only. Walking the parser's event stream once gives every key and value a position,
//! so every config error, whichever stage finds it, can name file:line:col.

use serde_saphyr::granit_parser::{Event, Parser};
use std::collections::HashMap;

/// A 1-based line and column in the config source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    /// Where the key (for mapping entries) or the item (for sequence entries) starts.
    key: Pos,
    /// Where the value starts.
    value: Pos,
    /// Character offsets of the key (or item) start, of the value's start and of its end.
    start: usize,
    value_start: usize,
    end: usize,
}

/// Positions of every node of a YAML document, by key path.
#[derive(Debug, Default)]
pub struct Locator {
    entries: HashMap<String, Entry>,
    /// Value positions in document order, for finding the node an error position falls in.
    ordered: Vec<(Pos, String)>,
}

enum Frame {
    Mapping {
        path: String,
        /// The key just read (text, position, character offset), waiting for its value.
        key: Option<(String, Pos, usize)>,
        /// Depth of a complex (non-scalar) key being skipped.
        skipping_key: usize,
    },
    Sequence {
        path: String,
        index: usize,
    },
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Locator {
    /// Builds the map. A document that does not parse yields whatever was seen before the
    /// error; the parse error itself is reported by the deserializer.
    pub fn new(source: &str) -> Self {
        let mut loc = Locator::default();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(source) {
            let Ok((event, span)) = item else { break };
            let pos = Pos {
                line: span.start.line(),
                col: span.start.col() + 1,
            };
            let (start, end) = (span.start.index(), span.end.index());
            let is_start = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            let is_end = matches!(event, Event::MappingEnd | Event::SequenceEnd);
            let is_node = is_start || matches!(event, Event::Scalar(..) | Event::Alias(..));

            // Complex mapping keys are skipped whole.
            if let Some(Frame::Mapping {
                skipping_key, key, ..
            }) = stack.last_mut()
                && *skipping_key > 0
            {
                if is_start {
                    *skipping_key += 1;
                } else if is_end {
                    *skipping_key -= 1;
                    if *skipping_key == 0 {
                        // The value that follows belongs to the complex key: give it a
                        // placeholder name so it is not taken for the next key.
                        *key = Some(("?".to_owned(), pos, start));
                    }
                }
                continue;
            }
            if is_end {
                // A collection's entry ends where its end event does.
                if let Some(Frame::Mapping { path, .. } | Frame::Sequence { path, .. }) =
                    stack.pop()
                    && let Some(entry) = loc.entries.get_mut(&path)
                {
                    entry.end = end;
                }
                continue;
            }
            if !is_node {
                continue;
            }
            // Which path does this node take, and is it a key?
            let node_path = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Sequence { path, index }) => {
                    let p = format!("{path}[{index}]");
                    *index += 1;
                    loc.entries.insert(
                        p.clone(),
                        Entry {
                            key: pos,
                            value: pos,
                            start,
                            value_start: start,
                            end,
                        },
                    );
                    Some(p)
                }
                Some(Frame::Mapping {
                    path,
                    key,
                    skipping_key,
                }) => match key.take() {
                    None => {
                        if let Event::Scalar(text, ..) = &event {
                            // A key's own position belongs to its path too, so an error
                            // at a key (duplicate, unknown) maps back to that key.
                            loc.ordered.push((pos, join_key(path, text)));
                            *key = Some((text.to_string(), pos, start));
                        } else if is_start {
                            *skipping_key = 1;
                        }
                        None
                    }
                    Some((k, key_pos, key_start)) => {
                        let p = join_key(path, &k);
                        loc.entries.insert(
                            p.clone(),
                            Entry {
                                key: key_pos,
                                value: pos,
                                start: key_start,
                                value_start: start,
                                end,
                            },
                        );
                        Some(p)
                    }
                },
            };
            let Some(path) = node_path else { continue };
            loc.ordered.push((pos, path.clone()));
            match event {
                Event::MappingStart(..) => stack.push(Frame::Mapping {
                    path,
                    key: None,
                    skipping_key: 0,
                }),
                Event::SequenceStart(..) => stack.push(Frame::Sequence { path, index: 0 }),
                _ => {}
            }
        }
        loc
    }

    /// Where the value at `path` starts (the most useful place for "this value is wrong").
    pub fn value(&self, path: &str) -> Option<Pos> {
        self.entries.get(path).map(|e| e.value)
    }

    /// Where the key at `path` starts (the place for "this key is unknown").
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.entries.get(path).map(|e| e.key)
    }

    /// Character offsets from the start of the key (or sequence item) at `path` to the
    /// end of its value.
    pub fn extent(&self, path: &str) -> Option<(usize, usize)> {
        self.entries
            .get(path)
            .map(|e| (e.start, e.end))
            .filter(|(s, e)| s < e)
    }

    /// Character offsets of the value at `path`: from its start to its end.
    pub fn value_extent(&self, path: &str) -> Option<(usize, usize)> {
        self.entries
            .get(path)
            .map(|e| (e.value_start, e.end.max(e.value_start)))
    }

    /// The deepest node starting at or before `pos`: the key path an error position belongs to.
    pub fn path_at(&self, pos: Pos) -> Option<&str> {
        let idx = self.ordered.partition_point(|(p, _)| *p <= pos);
        idx.checked_sub(1)
            .and_then(|i| self.ordered.get(i))
            .map(|(_, path)| path.as_str())
            .filter(|p| !p.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "listen:\n  http: 0.0.0.0:80\nsites:\n  - hosts: [a.com, b.com]\n    routes:\n      - path: /v1/\n        upstreams: [x:1]\n";

    #[test]
    fn keys_and_values_have_positions() {
        let loc = Locator::new(DOC);
        assert_eq!(loc.key("listen.http"), Some(Pos { line: 2, col: 3 }));
        assert_eq!(loc.value("listen.http"), Some(Pos { line: 2, col: 9 }));
        assert_eq!(
            loc.value("sites[0].hosts[1]"),
            Some(Pos { line: 4, col: 20 })
        );
        assert_eq!(
            loc.value("sites[0].routes[0].path"),
            Some(Pos { line: 6, col: 15 })
        );
        assert_eq!(
            loc.value("sites[0].routes[0].upstreams[0]"),
            Some(Pos { line: 7, col: 21 })
        );
    }

    #[test]
    fn error_positions_map_back_to_paths() {
        let loc = Locator::new(DOC);
        assert_eq!(
            loc.path_at(Pos { line: 6, col: 16 }),
            Some("sites[0].routes[0].path")
        );
        assert_eq!(loc.path_at(Pos { line: 2, col: 12 }), Some("listen.http"));
    }

    #[test]
    fn extents_cover_key_and_value() {
        let doc = "listen:\n  http: 0.0.0.0:80\n  admin: {a: 1, b: [x]}\nsites:\n  - hosts: [a.com]\n    health:\n      path: /h\n      interval: \"5s\"\nnext: 1\n";
        let loc = Locator::new(doc);
        let text = |path: &str| {
            let (s, e) = loc.extent(path).expect(path);
            doc.chars().skip(s).take(e - s).collect::<String>()
        };
        assert_eq!(text("listen.http"), "http: 0.0.0.0:80");
        assert_eq!(text("listen.admin"), "admin: {a: 1, b: [x]}");
        assert_eq!(text("sites[0].hosts[0]"), "a.com");
        assert_eq!(text("sites[0].health.interval"), "interval: \"5s\"");
        assert!(text("sites[0].health").starts_with("health:\n      path: /h"));
        assert!(!text("sites[0].health").contains("next"));
        assert!(!text("sites").contains("next"));
        assert_eq!(text("next"), "next: 1");
    }

    #[test]
    fn complex_keys_are_skipped() {
        let loc = Locator::new("? [a, b]\n: 1\nc: 2\n");
        assert_eq!(loc.value("c"), Some(Pos { line: 3, col: 4 }));
    }
}
