//! The IR's text form. Printing then parsing gives back an equal module (after
//! [`Graph::canonicalize`], which the parser applies).
//!
//! ```text
//! module "tiny.en" {
//!   param n_mels = 80
//!   weight @encoder.conv1.weight: f16[384,80,3] = "encoder/conv1/weight"
//!   weight @decoder.layers.0.self_attn.q_proj.weight: f16[384,384] = "decoder/layer_0/self_attention/linear_0/weight"[0:384]
//!   graph encoder(%mel: f32[80,3000]) {
//!     %conv1: f32[384,3000] = conv1d{stride=1, padding=1}(%mel, @encoder.conv1.weight, @encoder.conv1.bias)
//!     ...
//!     return (%audio_features)
//!   }
//! }
//! ```
//! `#` starts a comment that runs to the end of the line.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{Graph, Module, ValueDef, ValueId, WeightSource};
use crate::op::Op;
use crate::types::{DType, TensorType};

/// Prints the whole module.
pub fn print_module(m: &Module) -> String {
    let mut s = String::new();
    writeln!(s, "module {} {{", quote(&m.name)).unwrap();
    for (k, v) in &m.params {
        writeln!(s, "  param {k} = {v}").unwrap();
    }
    for w in &m.weights {
        write!(s, "  weight @{}: {} = {}", w.name, w.ty, quote(&w.source.tensor)).unwrap();
        if let Some((a, b)) = w.source.rows {
            write!(s, "[{a}:{b}]").unwrap();
        }
        s.push('\n');
    }
    for g in &m.graphs {
        s.push_str(&indent(&print_graph(g)));
    }
    s.push_str("}\n");
    s
}

/// A string literal as the lexer reads it back: `"` `\\` and newline escaped, every other
/// character as itself (Rust's `{:?}` escapes more than the lexer knows).
fn quote(text: &str) -> String {
    let mut q = String::with_capacity(text.len() + 2);
    q.push('"');
    for c in text.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn operand(g: &Graph, id: ValueId) -> String {
    let v = g.value(id);
    match v.def {
        ValueDef::Weight(ref w) => format!("@{w}"),
        _ => format!("%{}", v.name),
    }
}

/// Prints one graph.
pub fn print_graph(g: &Graph) -> String {
    let mut s = String::new();
    let inputs: Vec<String> = g.inputs.iter().map(|&i| format!("%{}: {}", g.value(i).name, g.ty(i))).collect();
    writeln!(s, "graph {}({}) {{", g.name, inputs.join(", ")).unwrap();
    for node in &g.nodes {
        let out = g.value(node.output);
        write!(s, "  %{}: {} = {}", out.name, out.ty, node.op.name()).unwrap();
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(s, "{{{}}}", parts.join(", ")).unwrap();
        }
        let args: Vec<String> = node.inputs.iter().map(|&i| operand(g, i)).collect();
        writeln!(s, "({})", args.join(", ")).unwrap();
    }
    let outs: Vec<String> = g.outputs.iter().map(|&o| operand(g, o)).collect();
    writeln!(s, "  return ({})", outs.join(", ")).unwrap();
    s.push_str("}\n");
    s
}

/// A syntax or reference error in IR text, with its line.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Local(String),
    Global(String),
    Str(String),
    Punct(char),
    Arrow,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '+')
}

fn lex(text: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let err = |line, msg: String| ParseError { line, msg };
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => s.push(c),
                            Some('n') => s.push('\n'),
                            other => return Err(err(line, format!("bad escape \\{other:?} in string"))),
                        },
                        Some('\n') | None => return Err(err(line, "unterminated string".into())),
                        Some(c) => s.push(c),
                    }
                }
                out.push((Tok::Str(s), line));
            }
            '%' | '@' => {
                chars.next();
                let mut s = String::new();
                while chars.peek().is_some_and(|&c| is_word_char(c)) {
                    s.push(chars.next().unwrap());
                }
                if s.is_empty() {
                    return Err(err(line, format!("`{c}` must be followed by a name")));
                }
                out.push((if c == '%' { Tok::Local(s) } else { Tok::Global(s) }, line));
            }
            '-' if {
                let mut ahead = chars.clone();
                ahead.next();
                ahead.peek() == Some(&'>')
            } =>
            {
                chars.next();
                chars.next();
                out.push((Tok::Arrow, line));
            }
            c if is_word_char(c) => {
                let mut s = String::new();
                while chars.peek().is_some_and(|&c| is_word_char(c)) {
                    s.push(chars.next().unwrap());
                }
                out.push((Tok::Word(s), line));
            }
            '{' | '}' | '(' | ')' | '[' | ']' | ':' | '=' | ',' => {
                chars.next();
                out.push((Tok::Punct(c), line));
            }
            other => return Err(err(line, format!("unexpected character `{other}`"))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Parser {
    fn line(&self) -> usize {
        self.toks.get(self.pos).or(self.toks.last()).map(|t| t.1).unwrap_or(1)
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError { line: self.line(), msg: msg.into() })
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn next(&mut self) -> Result<Tok, ParseError> {
        match self.toks.get(self.pos) {
            Some((t, _)) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => self.err("unexpected end of input"),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), ParseError> {
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            other => {
                self.pos -= 1;
                self.err(format!("expected `{c}`, found {}", describe(&other)))
            }
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> Result<String, ParseError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            other => {
                self.pos -= 1;
                self.err(format!("expected a name or number, found {}", describe(&other)))
            }
        }
    }

    fn keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        match self.next()? {
            Tok::Word(w) if w == kw => Ok(()),
            other => {
                self.pos -= 1;
                self.err(format!("expected `{kw}`, found {}", describe(&other)))
            }
        }
    }

    fn number<T: std::str::FromStr>(&mut self) -> Result<T, ParseError> {
        let w = self.word()?;
        match w.parse() {
            Ok(v) => Ok(v),
            Err(_) => {
                self.pos -= 1;
                self.err(format!("expected a number, found `{w}`"))
            }
        }
    }

    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let d = self.word()?;
        let Some(dtype) = DType::from_name(&d) else {
            self.pos -= 1;
            return self.err(format!("unknown dtype `{d}`"));
        };
        self.punct('[')?;
        let mut shape = Vec::new();
        if !self.eat_punct(']') {
            loop {
                shape.push(self.number()?);
                if self.eat_punct(']') {
                    break;
                }
                self.punct(',')?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }

    /// An attribute value: a word, or a bracketed list of words, returned as text.
    fn attr_value(&mut self) -> Result<String, ParseError> {
        if self.eat_punct('[') {
            let mut items = Vec::new();
            if !self.eat_punct(']') {
                loop {
                    items.push(self.word()?);
                    if self.eat_punct(']') {
                        break;
                    }
                    self.punct(',')?;
                }
            }
            Ok(format!("[{}]", items.join(",")))
        } else {
            self.word()
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => format!("`{w}`"),
        Tok::Local(w) => format!("`%{w}`"),
        Tok::Global(w) => format!("`@{w}`"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Arrow => "`->`".into(),
    }
}

/// Parses a module from its text form. References are resolved (an unknown `%value` or
/// `@weight` is an error here); types are checked by [`crate::verify`].
pub fn parse_module(text: &str) -> Result<Module, ParseError> {
    let mut p = Parser { toks: lex(text)?, pos: 0 };
    p.keyword("module")?;
    let name = match p.next()? {
        Tok::Str(s) => s,
        Tok::Word(w) => w,
        other => return p.err(format!("expected the module's name, found {}", describe(&other))),
    };
    let mut m = Module::new(name);
    p.punct('{')?;
    loop {
        match p.next()? {
            Tok::Punct('}') => break,
            Tok::Word(w) if w == "param" => {
                let key = p.word()?;
                p.punct('=')?;
                let v = p.number()?;
                if m.params.insert(key.clone(), v).is_some() {
                    return p.err(format!("param `{key}` is given twice"));
                }
            }
            Tok::Word(w) if w == "weight" => {
                let Tok::Global(wname) = p.next()? else {
                    p.pos -= 1;
                    return p.err("expected `@name` after `weight`");
                };
                p.punct(':')?;
                let ty = p.tensor_type()?;
                p.punct('=')?;
                let Tok::Str(tensor) = p.next()? else {
                    p.pos -= 1;
                    return p.err("expected the source tensor's name as a string");
                };
                let rows = if p.eat_punct('[') {
                    let a = p.number()?;
                    p.punct(':')?;
                    let b = p.number()?;
                    p.punct(']')?;
                    Some((a, b))
                } else {
                    None
                };
                m.add_weight(wname, ty, WeightSource { tensor, rows });
            }
            Tok::Word(w) if w == "graph" => {
                let g = parse_graph(&mut p, &m)?;
                m.graphs.push(g);
            }
            other => {
                p.pos -= 1;
                return p.err(format!("expected `param`, `weight`, `graph` or `}}`, found {}", describe(&other)));
            }
        }
    }
    if p.peek().is_some() {
        return p.err("text after the end of the module");
    }
    Ok(m)
}

fn parse_graph(p: &mut Parser, m: &Module) -> Result<Graph, ParseError> {
    let mut g = Graph::new(p.word()?);
    let mut locals: HashMap<String, ValueId> = HashMap::new();
    p.punct('(')?;
    if !p.eat_punct(')') {
        loop {
            let Tok::Local(name) = p.next()? else {
                p.pos -= 1;
                return p.err("expected `%name` of an input");
            };
            p.punct(':')?;
            let ty = p.tensor_type()?;
            if locals.contains_key(&name) {
                return p.err(format!("%{name} is defined twice"));
            }
            locals.insert(name.clone(), g.add_input(name, ty));
            if p.eat_punct(')') {
                break;
            }
            p.punct(',')?;
        }
    }
    p.punct('{')?;
    let operand = |p: &mut Parser, g: &mut Graph, locals: &HashMap<String, ValueId>| match p.next()? {
        Tok::Local(n) => match locals.get(&n) {
            Some(&id) => Ok(id),
            None => p.err(format!("%{n} is not defined (dangling reference)")),
        },
        Tok::Global(n) => match m.weight(&n) {
            Some(decl) => Ok(g.use_weight(decl)),
            None => p.err(format!("@{n} is not a declared weight")),
        },
        other => {
            p.pos -= 1;
            p.err(format!("expected `%value` or `@weight`, found {}", describe(&other)))
        }
    };
    loop {
        match p.next()? {
            Tok::Local(name) => {
                p.punct(':')?;
                let ty = p.tensor_type()?;
                p.punct('=')?;
                let op_name = p.word()?;
                let mut attrs = Vec::new();
                if p.eat_punct('{') && !p.eat_punct('}') {
                    loop {
                        let k = p.word()?;
                        p.punct('=')?;
                        attrs.push((k, p.attr_value()?));
                        if p.eat_punct('}') {
                            break;
                        }
                        p.punct(',')?;
                    }
                }
                let op = match Op::from_parts(&op_name, &attrs) {
                    Ok(op) => op,
                    Err(e) => return p.err(e),
                };
                p.punct('(')?;
                let mut args = Vec::new();
                if !p.eat_punct(')') {
                    loop {
                        args.push(operand(p, &mut g, &locals)?);
                        if p.eat_punct(')') {
                            break;
                        }
                        p.punct(',')?;
                    }
                }
                if locals.contains_key(&name) {
                    return p.err(format!("%{name} is defined twice"));
                }
                let id = g.add_node_typed(name.clone(), op, &args, ty);
                locals.insert(name, id);
            }
            Tok::Word(w) if w == "return" => {
                p.punct('(')?;
                if !p.eat_punct(')') {
                    loop {
                        let o = operand(p, &mut g, &locals)?;
                        g.outputs.push(o);
                        if p.eat_punct(')') {
                            break;
                        }
                        p.punct(',')?;
                    }
                }
                p.punct('}')?;
                break;
            }
            other => {
                p.pos -= 1;
                return p
                    .err(format!("expected a node `%name: type = op(...)` or `return`, found {}", describe(&other)));
            }
        }
    }
    g.canonicalize();
    Ok(g)
}
