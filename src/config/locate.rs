//! Every config message names its place the same way, whichever check found the problem:
//! a table of an array by its `name` when it has one (`cluster "api"`), else by its 1-based
//! position (`route 2`, `cluster "api" endpoint 1`), then the key (`: health_check.interval`,
//! `: sni 1: host`), then the line of the file when the place can be found in it.
//!
//! Type errors come from serde with a path of its own (`cluster[0].endpoint[0].weight`);
//! [`serde_path`] rewrites it into those words. Checks after parsing build the words
//! themselves; [`line_of`] walks them back through the document to the line. The document is
//! read with toml_edit, which keeps each key's place in the text: toml's own types drop it.

use std::ops::Range;
use toml_edit::{ImDocument, Item, Table, TableLike, Value};

/// A place in the document: a key's item, a table of an array of tables, or an array's value.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn table(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// The value under `key`, with the span of the key itself.
    fn get(self, key: &str) -> Option<(Node<'a>, Option<Range<usize>>)> {
        let (k, item) = self.table()?.get_key_value(key)?;
        Some((Node::Item(item), k.span()))
    }

    fn element(self, i: usize) -> Option<Node<'a>> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(Node::Value)
            }
            _ => None,
        }
    }

    fn is_table_array(self) -> bool {
        matches!(self, Node::Item(Item::ArrayOfTables(_)))
    }

    fn name(self) -> Option<&'a str> {
        self.table()?.get("name")?.as_str()
    }
}

/// serde's path into the words validation uses: array elements 1-based or by name.
pub(super) fn serde_path(text: &str, path: &str) -> String {
    let doc = ImDocument::parse(text).ok();
    let mut node = doc.as_ref().map(|d| Node::Item(d.as_item()));
    let mut head = String::new();
    let mut keys = String::new();
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (key, indices) = split_indices(seg);
        let under_key = node.and_then(|n| n.get(key)).map(|(n, _)| n);
        // Only the tables of a top-level array go in the head, as validation names them.
        let in_head =
            keys.is_empty() && !indices.is_empty() && under_key.is_some_and(Node::is_table_array);
        node = under_key;
        let mut words = key.to_string();
        for i in indices {
            node = node.and_then(|n| n.element(i));
            match node.and_then(Node::name).filter(|_| in_head) {
                Some(name) => words.push_str(&format!(" {name:?}")),
                None => words.push_str(&format!(" {}", i + 1)),
            }
        }
        let to = if in_head { &mut head } else { &mut keys };
        if !to.is_empty() {
            // After an array element the key starts a new part, as in `sni 1: host`.
            to.push_str(
                match (
                    in_head,
                    to.ends_with(|c: char| c.is_ascii_digit() || c == '"'),
                ) {
                    (true, _) => " ",
                    (false, true) => ": ",
                    (false, false) => ".",
                },
            );
        }
        to.push_str(&words);
    }
    match (head.is_empty(), keys.is_empty()) {
        (true, _) => keys,
        (false, true) => head,
        (false, false) => format!("{head}: {keys}"),
    }
}

/// The 1-based line of the place a message names, if the document has it.
pub(super) fn line_of(text: &str, path: &str) -> Option<usize> {
    let doc = ImDocument::parse(text).ok()?;
    let mut node = Node::Item(doc.as_item());
    let mut span = None;
    for step in steps(path) {
        let (next, at) = match step {
            Step::Key(k) => match node.get(&k) {
                Some((next, key_span)) => (next, key_span.or_else(|| next.span())),
                // The message names a key the file leaves out (a missing one): the table is
                // the closest place.
                None => break,
            },
            Step::Index(i) => {
                let next = node.element(i)?;
                (next, next.span())
            }
            Step::Named(name) => {
                let next = (0..)
                    .map_while(|i| node.element(i))
                    .find(|n| n.name() == Some(name.as_str()))?;
                (next, next.span())
            }
        };
        node = next;
        span = at.or(span);
    }
    let start = span?.start.min(text.len());
    Some(text[..start].matches('\n').count() + 1)
}

/// One step into the document.
enum Step {
    Key(String),
    /// An element of an array, 0-based.
    Index(usize),
    /// The table of an array of tables whose `name` is this.
    Named(String),
}

/// Our words back into steps: `cluster "api" endpoint 2: health_check.port` is
/// cluster, named api, endpoint, element 1, health_check, port.
fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in path.split(": ") {
        let mut words = part.split(' ').peekable();
        while let Some(word) = words.next() {
            out.extend(word.split('.').map(|k| Step::Key(k.to_string())));
            match words.peek() {
                Some(w) if w.len() > 1 && w.starts_with('"') && w.ends_with('"') => {
                    out.push(Step::Named(w[1..w.len() - 1].to_string()));
                    words.next();
                }
                Some(w) => {
                    if let Some(n) = w.parse::<usize>().ok().filter(|n| *n > 0) {
                        out.push(Step::Index(n - 1));
                        words.next();
                    }
                }
                None => {}
            }
        }
    }
    out
}

/// `endpoint[0][1]` is `endpoint` and `[0, 1]`.
fn split_indices(seg: &str) -> (&str, Vec<usize>) {
    let key_end = seg.find('[').unwrap_or(seg.len());
    let indices = seg[key_end..]
        .split(['[', ']'])
        .filter_map(|s| s.parse().ok())
        .collect();
    (&seg[..key_end], indices)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "[locality]\nregion = \"r\"\n\n[[cluster]]\nname = \"api\"\n[cluster.health_check]\ninterval = \"1s\"\n[[cluster.endpoint]]\naddress = \"a:1\"\n[[cluster.endpoint]]\naddress = \"b:1\"\nweight = \"x\"\n\n[[route]]\ncluster = \"api\"\n[[listener]]\nname = \"tls\"\nsni = [{ host = \"a\" },\n  { host = \"b\" }]\n";

    #[test]
    fn serde_paths_read_like_validation() {
        let cases = [
            (
                "cluster[0].endpoint[1].weight",
                "cluster \"api\" endpoint 2: weight",
            ),
            (
                "cluster[0].health_check.interval",
                "cluster \"api\": health_check.interval",
            ),
            ("route[0].cluster", "route 1: cluster"),
            ("listener[0].sni[1].host", "listener \"tls\": sni 2: host"),
            ("locality.region", "locality.region"),
            ("cluster[3].name", "cluster 4: name"),
        ];
        for (serde, ours) in cases {
            assert_eq!(serde_path(DOC, serde), ours, "{serde}");
        }
    }

    #[test]
    fn lines_of_our_words() {
        let cases = [
            ("cluster \"api\" endpoint 2: weight", Some(12)),
            ("cluster \"api\" endpoint 1: address", Some(9)),
            ("cluster \"api\": health_check.interval", Some(7)),
            ("route 1: cluster", Some(15)),
            ("listener \"tls\": sni 2: host", Some(19)),
            ("locality.region", Some(2)),
            // A key the file leaves out: the line of its table.
            ("cluster \"api\" endpoint 1: region", Some(8)),
            ("cluster \"nope\": name", None),
            ("", None),
        ];
        for (path, line) in cases {
            assert_eq!(line_of(DOC, path), line, "{path}");
        }
    }
}
