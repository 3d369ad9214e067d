//! Op attributes: a small, typed, ordered map.

use crate::types::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// One attribute value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attr {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Ints(Vec<i64>),
    DType(DType),
}

/// The kind of an attribute, as the op table declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrKind {
    Bool,
    Int,
    Float,
    Str,
    Ints,
    DType,
}

impl AttrKind {
    pub fn name(self) -> &'static str {
        match self {
            AttrKind::Bool => "bool",
            AttrKind::Int => "int",
            AttrKind::Float => "float",
            AttrKind::Str => "string",
            AttrKind::Ints => "int list",
            AttrKind::DType => "dtype",
        }
    }
}

impl Attr {
    pub fn kind(&self) -> AttrKind {
        match self {
            Attr::Bool(_) => AttrKind::Bool,
            Attr::Int(_) => AttrKind::Int,
            Attr::Float(_) => AttrKind::Float,
            Attr::Str(_) => AttrKind::Str,
            Attr::Ints(_) => AttrKind::Ints,
            Attr::DType(_) => AttrKind::DType,
        }
    }
}

impl fmt::Display for Attr {
    /// The canonical text form; [`crate::text::parse`] reads it back to an equal value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Int(i) => write!(f, "{i}"),
            // `{:?}` is Rust's shortest representation that reads back to the same f64, and it
            // always carries a `.` or an exponent, so the parser can tell it from an int.
            Attr::Float(x) => write!(f, "{x:?}"),
            Attr::Str(s) => write!(f, "\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            Attr::Ints(v) => {
                f.write_str("[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
            Attr::DType(d) => write!(f, "{d}"),
        }
    }
}

/// An attribute whose string value is one of a fixed set: typed in Rust, the same text in
/// `.tir` (`reduce = "max"`). Absent means [`Default`] (the `#[default]` variant).
pub trait Choice: Copy + Default + PartialEq + fmt::Debug + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The value's text.
    fn name(self) -> &'static str;
    /// The attribute holding this value.
    fn attr(self) -> Attr {
        Attr::Str(self.name().to_string())
    }
}

macro_rules! choice {
    ($(#[$m:meta])* $ty:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub enum $ty {
            $($(#[$vm])* $v,)*
        }
        impl Choice for $ty {
            const ALL: &'static [Self] = &[$($ty::$v),*];
            fn name(self) -> &'static str {
                match self {
                    $($ty::$v => $s,)*
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice! {
    /// How `all_reduce` combines the ranks' operands.
    ReduceKind {
        #[default]
        Sum => "sum",
        /// Carries no gradient (the vocab-parallel cross-entropy's global max only shifts).
        Max => "max",
    }
}

choice! {
    /// GELU's formula: GPT-2's tanh approximation (`gelu_new`) or the exact erf form.
    GeluApproximation {
        #[default]
        Tanh => "tanh",
        Erf => "none",
    }
}

choice! {
    /// The adjoint of an `all_gather` (attribute `grad`): sum the consumers' partial adjoints
    /// into this rank's chunk (reduce-scatter), or, when replicated compute reads the gathered
    /// value whole and every rank's adjoint is already complete, keep this rank's chunk.
    GatherAdjoint {
        #[default]
        ReduceScatter => "sum",
        Slice => "slice",
    }
}

/// Attributes of one node, ordered by name so that printing is canonical.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attrs(pub BTreeMap<String, Attr>);

impl Attrs {
    pub fn new() -> Self {
        Attrs(BTreeMap::new())
    }

    /// Builder-style insert.
    pub fn with(mut self, name: &str, value: Attr) -> Self {
        self.0.insert(name.to_string(), value);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Attr> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Attr)> {
        self.0.iter()
    }

    /// The bool attribute `name`, or `default` when absent. Kinds are checked by the verifier.
    pub fn bool_or(&self, name: &str, default: bool) -> bool {
        match self.get(name) {
            Some(Attr::Bool(b)) => *b,
            _ => default,
        }
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Some(Attr::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn float(&self, name: &str) -> Option<f64> {
        match self.get(name) {
            Some(Attr::Float(x)) => Some(*x),
            Some(Attr::Int(i)) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Attr::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.get(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }

    /// The [`Choice`] attribute `name` (its default when absent), or what is wrong with it.
    pub fn choice<T: Choice>(&self, name: &str) -> Result<T, String> {
        match self.get(name) {
            None => Ok(T::default()),
            Some(Attr::Str(s)) => T::ALL.iter().copied().find(|c| c.name() == s).ok_or_else(|| {
                let all: Vec<String> = T::ALL.iter().map(|c| format!("\"{}\"", c.name())).collect();
                format!("{name} = \"{s}\" is not known; use {}", all.join(" or "))
            }),
            Some(a) => Err(format!("attribute `{name}` must be a string, found a {}", a.kind().name())),
        }
    }

    /// [`Attrs::choice`] of a verified node (the verifier has checked the value).
    pub fn choice_or_default<T: Choice>(&self, name: &str) -> T {
        self.choice(name).unwrap_or_default()
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        match self.get(name) {
            Some(Attr::DType(d)) => Some(*d),
            _ => None,
        }
    }
}
