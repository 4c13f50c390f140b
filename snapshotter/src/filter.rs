//! containerd's filter syntax, as `Walk` receives it.
//!
//! ```text
//! filters   := filter*                      (any filter may match; none = match all)
//! filter    := selector ("," selector)*     (all selectors must match)
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := a string between `"`, `/` or `|`, with Go escapes
//! ```
//! A selector without operator tests presence. The same grammar as containerd's `filters` package.

use regex::Regex;

/// A parsed list of filters; matches when any filter matches (or when there are none).
#[derive(Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

#[derive(Debug)]
struct Selector {
    fieldpath: Vec<String>,
    op: Option<Op>,
}

#[derive(Debug)]
enum Op {
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

/// Something a filter can look into: `fieldpath` -> value, or `None` when absent.
pub trait Adaptor {
    fn field(&self, fieldpath: &[String]) -> Option<String>;
}

#[derive(Debug, thiserror::Error)]
#[error("invalid filter {input:?} at byte {pos}: {message}")]
pub struct FilterError {
    input: String,
    pos: usize,
    message: String,
}

impl Filters {
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, FilterError> {
        let mut out = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                // containerd: an empty filter matches everything.
                out.push(Vec::new());
                continue;
            }
            out.push(Parser { input: f, pos: 0 }.parse()?);
        }
        Ok(Self(out))
    }

    pub fn matches(&self, target: &impl Adaptor) -> bool {
        self.0.is_empty() || self.0.iter().any(|selectors| selectors.iter().all(|s| s.matches(target)))
    }
}

impl Selector {
    fn matches(&self, target: &impl Adaptor) -> bool {
        let value = target.field(&self.fieldpath);
        match (&self.op, value) {
            (None, v) => v.is_some(),
            (Some(Op::Equal(want)), Some(v)) => &v == want,
            (Some(Op::NotEqual(want)), Some(v)) => &v != want,
            // containerd: a missing field never matches, not even `!=`.
            (Some(_), None) => false,
            (Some(Op::Matches(re)), Some(v)) => re.is_match(&v),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> FilterError {
        FilterError { input: self.input.to_string(), pos: self.pos, message: message.into() }
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_spaces(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn parse(mut self) -> Result<Vec<Selector>, FilterError> {
        let mut selectors = Vec::new();
        loop {
            self.skip_spaces();
            selectors.push(self.selector()?);
            self.skip_spaces();
            match self.peek() {
                None => return Ok(selectors),
                Some(',') => self.pos += 1,
                Some(c) => return Err(self.error(format!("expected ',' or end, found {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut fieldpath = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            fieldpath.push(self.field()?);
        }
        self.skip_spaces();
        let rest = &self.input[self.pos..];
        let op = ["==", "!=", "~="].into_iter().find(|op| rest.starts_with(op));
        let Some(op) = op else {
            return Ok(Selector { fieldpath, op: None });
        };
        self.pos += 2;
        self.skip_spaces();
        let value = self.value()?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(Regex::new(&value).map_err(|e| self.error(format!("bad regular expression: {e}")))?),
        };
        Ok(Selector { fieldpath, op: Some(op) })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        if let Some(q) = self.peek().filter(|c| is_quote(*c)) {
            return self.quoted(q);
        }
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !(c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                break;
            }
            self.pos += c.len_utf8();
        }
        if self.pos == start {
            return Err(self.error("expected a field name"));
        }
        Ok(self.input[start..self.pos].to_string())
    }

    fn value(&mut self) -> Result<String, FilterError> {
        if let Some(q) = self.peek().filter(|c| is_quote(*c)) {
            return self.quoted(q);
        }
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == ',' || c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
        if self.pos == start {
            return Err(self.error("expected a value"));
        }
        Ok(self.input[start..self.pos].to_string())
    }

    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        self.pos += quote.len_utf8();
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("quoted literal not terminated"));
            };
            self.pos += c.len_utf8();
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.peek() else {
                return Err(self.error("escape at end of input"));
            };
            self.pos += e.len_utf8();
            let decoded = match e {
                'a' => '\x07',
                'b' => '\x08',
                'f' => '\x0c',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'v' => '\x0b',
                '\\' => '\\',
                c if c == quote => c,
                'x' => self.hex_escape(2)?,
                'u' => self.hex_escape(4)?,
                'U' => self.hex_escape(8)?,
                _ => return Err(self.error(format!("unknown escape \\{e}"))),
            };
            out.push(decoded);
        }
    }

    fn hex_escape(&mut self, digits: usize) -> Result<char, FilterError> {
        let hex = self.input.get(self.pos..self.pos + digits).ok_or_else(|| self.error("short escape"))?;
        let code = u32::from_str_radix(hex, 16).map_err(|_| self.error("bad hex escape"))?;
        self.pos += digits;
        char::from_u32(code).ok_or_else(|| self.error("escape is not a character"))
    }
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);
    impl Adaptor for Map {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(ToString::to_string)
        }
    }

    fn target() -> Map {
        Map(HashMap::from([
            ("name", "a-wl"),
            ("kind", "active"),
            ("parent", ""),
            ("labels.containerd.io/gc.root", "check-walk"),
            ("labels.l", "2"),
        ]))
    }

    fn check(filters: &[&str]) -> bool {
        Filters::parse_all(filters).expect("parses").matches(&target())
    }

    #[test]
    fn containerd_walk_filters() {
        assert!(check(&[]));
        assert!(check(&["labels.\"containerd.io/gc.root\"==check-walk"]));
        assert!(check(&["kind==active,labels.\"containerd.io/gc.root\"==check-walk"]));
        assert!(!check(&["kind==view,labels.\"containerd.io/gc.root\"==check-walk"]));
        assert!(check(&["name==p", "name==a-wl"]));
        assert!(check(&["name==a-wl,labels.l"]));
        assert!(!check(&["labels.missing"]));
        assert!(!check(&["parent!=\"\""]));
        assert!(check(&["labels.l==2"]));
        assert!(check(&["name~=/^a-/"]));
        assert!(!check(&["labels.missing!=x"]));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in ["==x", "name==", "name==\"open", "name~=/(/", "name==a b", "name==\"\\q\""] {
            assert!(Filters::parse_all(&[bad]).is_err(), "{bad} should not parse");
        }
    }
}
