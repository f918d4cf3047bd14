//! Checks that a pyc's body is what Python can load: one complete,
//! well-formed marshalled code object and nothing after it.
//!
//! A valid header followed by a broken body is the worst pyc there is:
//! import uses it and fails (`EOFError`, `bad marshal data`) instead of
//! compiling the source. So every pyc that enters the store from outside a
//! compile worker (a pack, what Python writes into a mount, a remote) and
//! every object `verify` reads goes through [`check_pyc`].
//!
//! The checker is a structural parser of CPython's marshal format
//! (`Python/marshal.c`, `r_object`): every type code, `FLAG_REF` and the
//! back references it allows (to objects already complete), the length
//! limits and value rules marshal enforces (string sizes, long digits,
//! UTF-8 with surrogates, hashable dict keys and set items), and the code
//! object's field layout for the pyc's Python version, decided by the magic
//! number, with the field types the code constructor requires. It never
//! panics, allocates only a table of back references (at most one entry per
//! input byte) and recurses at most `MAX_DEPTH` (2000) levels, as marshal does.
//!
//! ```text
//! magic          Python           header  code object fields (i = i32, o = object)
//! 3379           CPython 3.6      12      argcount kwonly nlocals stacksize flags (i)
//! 3394           CPython 3.7      16        code consts names varnames freevars cellvars
//!                                           filename name (o) firstlineno (i) lnotab (o)
//! 3413 3425 3439 CPython 3.8-3.10 16      as 3.7 with posonly after argcount
//! 336            PyPy 3.9         16      as CPython 3.9
//! 3495 3531 3571 CPython 3.11-3.13 16     argcount posonly kwonly stacksize flags (i)
//!                                           code consts names localsplusnames
//!                                           localspluskinds filename name qualname (o)
//!                                           firstlineno (i) linetable exceptiontable (o)
//! ```
//!
//! Only the magic numbers of released versions are known: the layout moved
//! during alphas. Any other magic is [`BodyError::UnknownMagic`]: the body
//! cannot be checked, which says nothing about damage.

use crate::util::hex;
use std::fmt;

use crate::pyc::HEADER_LEN;

/// How deep marshal data may nest: CPython's `MAX_MARSHAL_STACK_DEPTH`.
/// Deeper data does not load, so it is damage.
pub(crate) const MAX_DEPTH: u32 = 2000;

/// The field layout of a marshalled code object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// CPython 3.6 and 3.7.
    Py36,
    /// CPython 3.8 to 3.10, PyPy 3.9.
    Py38,
    /// CPython 3.11 to 3.13.
    Py311,
}

/// The Python version a pyc was written for, as far as its format goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PycFormat {
    python: &'static str,
    header_len: usize,
    layout: Layout,
    /// PyPy's marshal refuses non-ASCII bytes in the ASCII string types
    /// (CPython reads them as Latin-1), and its code objects names with a
    /// NUL in them.
    pypy: bool,
}

impl PycFormat {
    /// The format of pycs with this magic number, if it is one of a
    /// released version this module knows.
    pub(crate) fn from_magic(magic: [u8; 4]) -> Option<PycFormat> {
        if magic[2..] != *b"\r\n" {
            return None;
        }
        let (python, header_len, layout) = match u16::from_le_bytes([magic[0], magic[1]]) {
            3379 => ("CPython 3.6", 12, Layout::Py36),
            3394 => ("CPython 3.7", HEADER_LEN, Layout::Py36),
            3413 => ("CPython 3.8", HEADER_LEN, Layout::Py38),
            3425 => ("CPython 3.9", HEADER_LEN, Layout::Py38),
            3439 => ("CPython 3.10", HEADER_LEN, Layout::Py38),
            336 => ("PyPy 3.9", HEADER_LEN, Layout::Py38),
            3495 => ("CPython 3.11", HEADER_LEN, Layout::Py311),
            3531 => ("CPython 3.12", HEADER_LEN, Layout::Py311),
            3571 => ("CPython 3.13", HEADER_LEN, Layout::Py311),
            _ => return None,
        };
        Some(PycFormat {
            python,
            header_len,
            layout,
            pypy: python.starts_with("PyPy"),
        })
    }

    /// The Python implementation and version, e.g. "CPython 3.11".
    pub fn python(&self) -> &'static str {
        self.python
    }

    /// The length of the header before the marshalled body (12 on 3.6).
    pub fn header_len(&self) -> usize {
        self.header_len
    }
}

/// Why a pyc is not loadable, or cannot be checked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Too short to hold a header.
    #[error("it is {len} bytes, too short for a pyc header")]
    Short {
        /// Its length.
        len: usize,
    },
    /// The first four bytes are no Python's magic number (a u16 and
    /// `\r\n`): no Python loads it.
    #[error("it is not a pyc: it does not start with a Python magic number (it starts with {})", hex(.0))]
    NotAPyc([u8; 4]),
    /// The magic number is not one of a Python release whose format this
    /// module knows: nothing can be said about the body. Not damage.
    #[error(
        "cannot check its body: the magic number {} is not one of a Python release \
         pycstore knows the bytecode format of",
        hex(.0)
    )]
    UnknownMagic([u8; 4]),
    /// Flag bits that make every Python reject the pyc.
    #[error("its header has invalid flags 0x{0:08x}")]
    BadFlags(u32),
    /// The body is not one complete, well-formed code object.
    #[error(
        "its body is not a loadable {python} code object: {what} (at byte {offset} of the file)"
    )]
    Damaged {
        /// The Python version the magic number names.
        python: &'static str,
        /// The offset in the file where the parse failed.
        offset: usize,
        /// What is wrong there.
        what: String,
    },
}

impl BodyError {
    /// Whether this proves the pyc unloadable (everything but
    /// [`BodyError::UnknownMagic`]).
    pub fn is_damage(&self) -> bool {
        !matches!(self, BodyError::UnknownMagic(_))
    }
}

/// Checks a whole pyc file: its header (magic, flags) and that its body is
/// exactly one well-formed code object for the Python its magic names.
/// Returns that Python's format.
///
/// An unknown magic number is [`BodyError::UnknownMagic`], which is not
/// damage ([`BodyError::is_damage`]); every other error means Python would
/// fail to load the pyc. Runs in time linear in `bytes`, never panics and
/// allocates at most one small table entry per back reference.
pub fn check_pyc(bytes: &[u8]) -> Result<PycFormat, BodyError> {
    let magic: [u8; 4] = match bytes.get(..4).and_then(|m| m.try_into().ok()) {
        Some(magic) => magic,
        None => return Err(BodyError::Short { len: bytes.len() }),
    };
    if magic[2..] != *b"\r\n" {
        return Err(BodyError::NotAPyc(magic));
    }
    let format = PycFormat::from_magic(magic).ok_or(BodyError::UnknownMagic(magic))?;
    if bytes.len() < format.header_len {
        return Err(BodyError::Short { len: bytes.len() });
    }
    if format.header_len == HEADER_LEN {
        let flags = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if flags & !0b11 != 0 {
            return Err(BodyError::BadFlags(flags));
        }
    }
    check_body(format, &bytes[format.header_len..]).map_err(|e| match e {
        BodyError::Damaged {
            python,
            offset,
            what,
        } => BodyError::Damaged {
            python,
            offset: offset + format.header_len,
            what,
        },
        other => other,
    })?;
    Ok(format)
}

/// Checks that `body` (a pyc without its header) is exactly one
/// well-formed code object in `format`. Offsets in errors count from the
/// start of `body`.
pub(crate) fn check_body(format: PycFormat, body: &[u8]) -> Result<(), BodyError> {
    // The back-reference table and the container stack of the thread's
    // last check, emptied: a pyc has hundreds of back references, and a
    // table grown one by one for each of the thousands of pycs a link
    // fetches costs reallocations (and their allocator's lock).
    thread_local! {
        static SCRATCH: std::cell::Cell<(Vec<Slot>, Vec<Frame>)> =
            const { std::cell::Cell::new((Vec::new(), Vec::new())) };
    }
    let (refs, stack) = SCRATCH.take();
    let mut parser = Parser {
        data: body,
        pos: 0,
        refs,
        stack,
        layout: format.layout,
        pypy: format.pypy,
    };
    let result = parser.object().and_then(|kind| match kind {
        Kind::Code if parser.pos == body.len() => Ok(()),
        Kind::Code => Err(Bad::at(
            parser.pos,
            format!("{} bytes after the code object", body.len() - parser.pos),
        )),
        Kind::Null => Err(Bad::at(0, "a NULL object instead of a code object")),
        other => Err(Bad::at(0, format!("{other} instead of a code object"))),
    });
    let Parser {
        mut refs,
        mut stack,
        ..
    } = parser;
    // Kept for the next check unless a hostile pyc made them huge.
    if refs.capacity() <= SCRATCH_KEPT && stack.capacity() <= SCRATCH_KEPT {
        refs.clear();
        stack.clear();
        SCRATCH.set((refs, stack));
    }
    result.map_err(|bad| BodyError::Damaged {
        python: format.python,
        offset: bad.offset,
        what: bad.what,
    })
}

/// The most back-reference slots or stack frames a thread keeps between
/// checks.
const SCRATCH_KEPT: usize = 1 << 16;

/// What a parsed object is, as far as the checks need to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// marshal's NULL: ends a dict, is an error anywhere else.
    Null,
    None,
    Bool,
    StopIteration,
    Ellipsis,
    Int,
    Float,
    Complex,
    Bytes {
        /// Its length.
        len: u32,
        /// Where its bytes start in the body: as a 3.11 code object's
        /// `co_localspluskinds`, the bytes are counted (how many plain
        /// locals, bit 0x20), only there.
        start: usize,
    },
    Str,
    /// A str with a NUL in it, for PyPy, whose code objects refuse it
    /// where they want a str.
    StrWithNul,
    Tuple {
        /// Every item is hashable.
        hashable: bool,
        /// Every item is a str.
        strs: bool,
        /// How many items.
        len: u32,
    },
    List,
    Dict,
    Set,
    FrozenSet,
    Code,
}

impl Kind {
    fn hashable(self) -> bool {
        match self {
            Kind::List | Kind::Dict | Kind::Set | Kind::Null => false,
            Kind::Tuple { hashable, .. } => hashable,
            _ => true,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Null => "NULL",
            Kind::None => "None",
            Kind::Bool => "a bool",
            Kind::StopIteration => "StopIteration",
            Kind::Ellipsis => "Ellipsis",
            Kind::Int => "an int",
            Kind::Float => "a float",
            Kind::Complex => "a complex",
            Kind::Bytes { .. } => "bytes",
            Kind::Str => "a str",
            Kind::StrWithNul => "a str with a NUL",
            Kind::Tuple { .. } => "a tuple",
            Kind::List => "a list",
            Kind::Dict => "a dict",
            Kind::Set => "a set",
            Kind::FrozenSet => "a frozenset",
            Kind::Code => "a code object",
        })
    }
}

/// A back-reference slot: reserved while its object (a code object or a
/// frozenset) is being read, when a reference to it does not load.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Reserved,
    Filled(Kind),
}

/// Where and why parsing failed.
struct Bad {
    offset: usize,
    what: String,
}

impl Bad {
    fn at(offset: usize, what: impl Into<String>) -> Bad {
        Bad {
            offset,
            what: what.into(),
        }
    }
}

/// marshal type codes.
mod code {
    pub const NULL: u8 = b'0';
    pub const NONE: u8 = b'N';
    pub const FALSE: u8 = b'F';
    pub const TRUE: u8 = b'T';
    pub const STOPITER: u8 = b'S';
    pub const ELLIPSIS: u8 = b'.';
    pub const INT: u8 = b'i';
    pub const INT64: u8 = b'I';
    pub const FLOAT: u8 = b'f';
    pub const BINARY_FLOAT: u8 = b'g';
    pub const COMPLEX: u8 = b'x';
    pub const BINARY_COMPLEX: u8 = b'y';
    pub const LONG: u8 = b'l';
    pub const STRING: u8 = b's';
    pub const INTERNED: u8 = b't';
    pub const REF: u8 = b'r';
    pub const TUPLE: u8 = b'(';
    pub const LIST: u8 = b'[';
    pub const DICT: u8 = b'{';
    pub const CODE: u8 = b'c';
    pub const UNICODE: u8 = b'u';
    pub const SET: u8 = b'<';
    pub const FROZENSET: u8 = b'>';
    pub const ASCII: u8 = b'a';
    pub const ASCII_INTERNED: u8 = b'A';
    pub const SMALL_TUPLE: u8 = b')';
    pub const SHORT_ASCII: u8 = b'z';
    pub const SHORT_ASCII_INTERNED: u8 = b'Z';
    pub const FLAG_REF: u8 = 0x80;
}

/// Code flags: the function takes `*args`, `**kwargs`.
const CO_VARARGS: i32 = 0x04;
const CO_VARKEYWORDS: i32 = 0x08;
/// In `co_localspluskinds` (3.11 and later): a plain local.
const CO_FAST_LOCAL: u8 = 0x20;

/// The largest size marshal accepts (`SIZE32_MAX`).
const SIZE32_MAX: i32 = i32::MAX;

struct Parser<'a> {
    data: &'a [u8],
    pos: usize,
    refs: Vec<Slot>,
    /// The containers being read ([`Parser::object`]).
    stack: Vec<Frame>,
    layout: Layout,
    pypy: bool,
}

/// A container being read: what it still expects.
enum Frame {
    /// A tuple, list, set or frozenset with `remaining` items to read.
    Items {
        kind: Kind,
        remaining: usize,
        len: u32,
        hashable: bool,
        strs: bool,
        slot: Option<usize>,
    },
    /// A dict, expecting a key, or the value of a key.
    Dict { value_of: Option<(usize, Kind)> },
    /// A code object, expecting its `next` object field.
    Code {
        next: usize,
        slot: Option<usize>,
        /// The names the arguments need: argcount + kwonlyargcount + one
        /// for `*args` + one for `**kwargs`.
        args: i64,
        /// How many `co_localsplusnames` (3.11 and later).
        names: u32,
    },
}

/// What a code object's field must be.
#[derive(Clone, Copy)]
enum Want {
    Bytes,
    Str,
    Tuple,
    StrTuple,
}

/// The object fields of a code object, in order. An i32 (`co_firstlineno`)
/// comes before field [`FIRSTLINENO_BEFORE`].
const FIELDS_PY36: &[(&str, Want)] = &[
    ("co_code", Want::Bytes),
    ("co_consts", Want::Tuple),
    ("co_names", Want::StrTuple),
    ("co_varnames", Want::StrTuple),
    ("co_freevars", Want::StrTuple),
    ("co_cellvars", Want::StrTuple),
    ("co_filename", Want::Str),
    ("co_name", Want::Str),
    ("co_lnotab", Want::Bytes),
];
const FIELDS_PY311: &[(&str, Want)] = &[
    ("co_code", Want::Bytes),
    ("co_consts", Want::Tuple),
    ("co_names", Want::StrTuple),
    ("co_localsplusnames", Want::StrTuple),
    ("co_localspluskinds", Want::Bytes),
    ("co_filename", Want::Str),
    ("co_name", Want::Str),
    ("co_qualname", Want::Str),
    ("co_linetable", Want::Bytes),
    ("co_exceptiontable", Want::Bytes),
];
const FIRSTLINENO_BEFORE: usize = 8;

/// What reading a type byte and what follows it gave.
enum Opened {
    /// A whole object.
    Done(Kind),
    /// A container whose items follow.
    Open(Frame),
}

impl<'a> Parser<'a> {
    /// Reads one object and everything in it (marshal's `r_object`), with
    /// an explicit stack of the containers being read, at most
    /// [`MAX_DEPTH`] deep.
    fn object(&mut self) -> Result<Kind, Bad> {
        let mut stack = std::mem::take(&mut self.stack);
        let result = self.object_with(&mut stack);
        self.stack = stack;
        result
    }

    fn object_with(&mut self, stack: &mut Vec<Frame>) -> Result<Kind, Bad> {
        loop {
            let at = self.pos;
            let byte = self.byte("an object")?;
            // This object's depth is the number of containers around it + 1.
            if stack.len() >= MAX_DEPTH as usize {
                return Err(Bad::at(
                    at,
                    format!("nested deeper than {MAX_DEPTH} levels"),
                ));
            }
            let mut value =
                match self.open(byte & !code::FLAG_REF, byte & code::FLAG_REF != 0, at)? {
                    Opened::Done(kind) => kind,
                    Opened::Open(frame) => match self.finished(&frame) {
                        Some(kind) => kind,
                        None => {
                            stack.push(frame);
                            continue;
                        }
                    },
                };
            // Hand the value to the containers around it, closing those it
            // completes.
            loop {
                let Some(frame) = stack.last_mut() else {
                    return Ok(value);
                };
                self.accept(frame, value, at)?;
                match self.finished(frame) {
                    Some(kind) => {
                        stack.pop();
                        value = kind;
                    }
                    None => break,
                }
            }
        }
    }

    fn eof(&self, what: &str) -> Bad {
        Bad::at(
            self.data.len(),
            format!("the data ends in the middle of {what}"),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Bad> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| self.eof(what))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self, what: &str) -> Result<u8, Bad> {
        Ok(self.take(1, what)?[0])
    }

    fn i32(&mut self, what: &str) -> Result<i32, Bad> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A size as marshal reads it: an i32 in `0..=SIZE32_MAX`.
    fn size(&mut self, what: &str) -> Result<usize, Bad> {
        let at = self.pos;
        let n = self.i32(what)?;
        if !(0..=SIZE32_MAX).contains(&n) {
            return Err(Bad::at(at, format!("{what} of size {n}")));
        }
        Ok(n as usize)
    }

    /// Records a finished object in the back-reference table when its type
    /// byte asked for it.
    fn remember(&mut self, flag: bool, kind: Kind) -> Opened {
        if flag {
            self.refs.push(Slot::Filled(kind));
        }
        Opened::Done(kind)
    }

    /// Gives a container a slot in the back-reference table before its
    /// items are read, as marshal does; returns its index.
    fn reserve(&mut self, flag: bool, slot: Slot, at: usize) -> Result<Option<usize>, Bad> {
        if !flag {
            return Ok(None);
        }
        if self.refs.len() >= 0x7fff_fffe {
            return Err(Bad::at(at, "too many back references"));
        }
        self.refs.push(slot);
        Ok(Some(self.refs.len() - 1))
    }

    /// Reads a type byte's object, or the head of a container.
    fn open(&mut self, ty: u8, flag: bool, at: usize) -> Result<Opened, Bad> {
        Ok(match ty {
            // Singletons are never remembered, whatever the flag says.
            code::NULL => Opened::Done(Kind::Null),
            code::NONE => Opened::Done(Kind::None),
            code::FALSE | code::TRUE => Opened::Done(Kind::Bool),
            code::STOPITER => Opened::Done(Kind::StopIteration),
            code::ELLIPSIS => Opened::Done(Kind::Ellipsis),
            code::INT => {
                self.take(4, "an int")?;
                self.remember(flag, Kind::Int)
            }
            code::INT64 => {
                self.take(8, "an int")?;
                self.remember(flag, Kind::Int)
            }
            code::LONG => {
                self.long()?;
                self.remember(flag, Kind::Int)
            }
            code::FLOAT => {
                self.float_str()?;
                self.remember(flag, Kind::Float)
            }
            code::BINARY_FLOAT => {
                self.take(8, "a float")?;
                self.remember(flag, Kind::Float)
            }
            code::COMPLEX => {
                self.float_str()?;
                self.float_str()?;
                self.remember(flag, Kind::Complex)
            }
            code::BINARY_COMPLEX => {
                self.take(16, "a complex")?;
                self.remember(flag, Kind::Complex)
            }
            code::STRING => {
                let n = self.size("a bytes object")?;
                let start = self.pos;
                self.take(n, "a bytes object")?;
                // Sizes are at most i32::MAX.
                let kind = Kind::Bytes {
                    len: n as u32,
                    start,
                };
                self.remember(flag, kind)
            }
            code::ASCII | code::ASCII_INTERNED => {
                let n = self.size("a str")?;
                let kind = self.ascii(n)?;
                self.remember(flag, kind)
            }
            code::SHORT_ASCII | code::SHORT_ASCII_INTERNED => {
                let n = self.byte("a str")?;
                let kind = self.ascii(n.into())?;
                self.remember(flag, kind)
            }
            code::UNICODE | code::INTERNED => {
                let n = self.size("a str")?;
                let start = self.pos;
                let text = self.take(n, "a str")?;
                if let Err(bad) = check_utf8_surrogatepass(text) {
                    return Err(Bad::at(start + bad, "a str that is not UTF-8"));
                }
                let kind = self.str_kind(text);
                self.remember(flag, kind)
            }
            code::SMALL_TUPLE | code::TUPLE | code::LIST | code::SET | code::FROZENSET => {
                let (kind, what) = match ty {
                    code::LIST => (Kind::List, "a list"),
                    code::SET => (Kind::Set, "a set"),
                    code::FROZENSET => (Kind::FrozenSet, "a frozenset"),
                    _ => (
                        Kind::Tuple {
                            hashable: true,
                            strs: true,
                            len: 0,
                        },
                        "a tuple",
                    ),
                };
                let remaining = if ty == code::SMALL_TUPLE {
                    self.byte(what)?.into()
                } else {
                    self.size(what)?
                };
                // A container may hold a reference to itself, except a
                // frozenset; a tuple counts as unhashable until complete.
                let placeholder = match kind {
                    Kind::FrozenSet => Slot::Reserved,
                    Kind::Tuple { .. } => Slot::Filled(Kind::Tuple {
                        hashable: false,
                        strs: false,
                        len: 0,
                    }),
                    other => Slot::Filled(other),
                };
                let slot = self.reserve(flag, placeholder, at)?;
                Opened::Open(Frame::Items {
                    kind,
                    remaining,
                    len: remaining as u32,
                    hashable: true,
                    strs: true,
                    slot,
                })
            }
            code::DICT => {
                self.reserve(flag, Slot::Filled(Kind::Dict), at)?;
                Opened::Open(Frame::Dict { value_of: None })
            }
            code::CODE => {
                let slot = self.reserve(flag, Slot::Reserved, at)?;
                let args = self.code_counts(at)?;
                Opened::Open(Frame::Code {
                    next: 0,
                    slot,
                    args,
                    names: 0,
                })
            }
            code::REF => {
                let n = self.i32("a back reference")?;
                match usize::try_from(n).ok().and_then(|n| self.refs.get(n)) {
                    Some(Slot::Filled(kind)) => Opened::Done(*kind),
                    Some(Slot::Reserved) => {
                        return Err(Bad::at(
                            at,
                            format!("a back reference to object {n}, which is not complete"),
                        ))
                    }
                    None => {
                        return Err(Bad::at(
                            at,
                            format!(
                                "a back reference to object {n} of the {} seen",
                                self.refs.len()
                            ),
                        ))
                    }
                }
            }
            other => return Err(Bad::at(at, format!("unknown type code 0x{other:02x}"))),
        })
    }

    /// Gives a container the object read at `at`.
    fn accept(&mut self, frame: &mut Frame, value: Kind, at: usize) -> Result<(), Bad> {
        match frame {
            Frame::Items {
                kind,
                remaining,
                hashable,
                strs,
                ..
            } => {
                if value == Kind::Null {
                    return Err(Bad::at(at, format!("a NULL object in {kind}")));
                }
                if matches!(kind, Kind::Set | Kind::FrozenSet) && !value.hashable() {
                    return Err(Bad::at(at, format!("{value} in {kind}")));
                }
                *hashable &= value.hashable();
                *strs &= value == Kind::Str;
                *remaining -= 1;
            }
            Frame::Dict { value_of } => match value_of.take() {
                // A NULL key or value ends the dict.
                None if value != Kind::Null && !value.hashable() => {
                    return Err(Bad::at(at, format!("{value} as a dict key")));
                }
                None => *value_of = Some((at, value)),
                Some(_) => {}
            },
            Frame::Code {
                next, args, names, ..
            } => {
                let fields = match self.layout {
                    Layout::Py36 | Layout::Py38 => FIELDS_PY36,
                    Layout::Py311 => FIELDS_PY311,
                };
                // `finished` closed the frame after the last field.
                let (name, want) = fields[*next];
                let ok = match want {
                    Want::Bytes => matches!(value, Kind::Bytes { .. }),
                    Want::Str => value == Kind::Str,
                    Want::Tuple => matches!(value, Kind::Tuple { .. }),
                    Want::StrTuple => matches!(value, Kind::Tuple { strs: true, .. }),
                };
                if !ok {
                    let wanted = match want {
                        Want::Bytes => "bytes",
                        Want::Str => "a str",
                        Want::Tuple => "a tuple",
                        Want::StrTuple => "a tuple of str",
                    };
                    return Err(Bad::at(
                        at,
                        format!("a code object whose {name} is {value}, not {wanted}"),
                    ));
                }
                // The code constructor's checks of the names against the
                // argument counts.
                let too_small = match (name, value) {
                    ("co_varnames", Kind::Tuple { len, .. }) => i64::from(len) < *args,
                    ("co_localsplusnames", Kind::Tuple { len, .. }) => {
                        *names = len;
                        false
                    }
                    ("co_localspluskinds", Kind::Bytes { len, start }) => {
                        if len != *names {
                            return Err(Bad::at(
                                at,
                                "a code object with more or fewer local kinds than local names",
                            ));
                        }
                        let kinds = &self.data[start..start + len as usize];
                        let fast_locals = kinds.iter().filter(|&&b| b & CO_FAST_LOCAL != 0).count();
                        (fast_locals as i64) < *args
                    }
                    _ => false,
                };
                if too_small {
                    return Err(Bad::at(
                        at,
                        "a code object with fewer local names than arguments",
                    ));
                }
                *next += 1;
                if *next == FIRSTLINENO_BEFORE {
                    self.i32("a code object")?;
                }
            }
        }
        Ok(())
    }

    /// The kind of a container that needs nothing more, after recording it
    /// in its back-reference slot; `None` while it expects more.
    fn finished(&mut self, frame: &Frame) -> Option<Kind> {
        let (kind, slot) = match frame {
            Frame::Items {
                kind,
                remaining: 0,
                len,
                hashable,
                strs,
                slot,
            } => match kind {
                Kind::Tuple { .. } => (
                    Kind::Tuple {
                        hashable: *hashable,
                        strs: *strs,
                        len: *len,
                    },
                    *slot,
                ),
                other => (*other, *slot),
            },
            Frame::Items { .. } => return None,
            // The dict's slot was filled when it opened.
            Frame::Dict {
                value_of: Some((_, Kind::Null)),
            } => return Some(Kind::Dict),
            Frame::Dict { .. } => return None,
            Frame::Code { next, slot, .. } => {
                let fields = match self.layout {
                    Layout::Py36 | Layout::Py38 => FIELDS_PY36.len(),
                    Layout::Py311 => FIELDS_PY311.len(),
                };
                if *next < fields {
                    return None;
                }
                (Kind::Code, *slot)
            }
        };
        if let Some(entry) = slot.and_then(|i| self.refs.get_mut(i)) {
            *entry = Slot::Filled(kind);
        }
        Some(kind)
    }

    /// A code object's integer fields, which come first; returns how many
    /// local names its arguments need.
    fn code_counts(&mut self, at: usize) -> Result<i64, Bad> {
        let counts = match self.layout {
            // argcount kwonlyargcount nlocals stacksize flags
            Layout::Py36 => 5,
            // argcount posonlyargcount kwonlyargcount nlocals stacksize flags
            Layout::Py38 => 6,
            // argcount posonlyargcount kwonlyargcount stacksize flags
            Layout::Py311 => 5,
        };
        let mut ints = [0i32; 6];
        for slot in ints.iter_mut().take(counts) {
            *slot = self.i32("a code object")?;
        }
        // The counts, and from 3.8 on the flags too, are not negative.
        let checked = if self.layout == Layout::Py36 {
            counts - 1
        } else {
            counts
        };
        let negative = ints[..checked].iter().any(|&n| n < 0);
        // argcount includes posonlyargcount.
        if negative || (self.layout != Layout::Py36 && ints[0] < ints[1]) {
            return Err(Bad::at(
                at,
                "a code object with negative argument counts or flags",
            ));
        }
        let (kwonly, flags) = match self.layout {
            Layout::Py36 => (ints[1], ints[4]),
            Layout::Py38 => (ints[2], ints[5]),
            Layout::Py311 => (ints[2], ints[4]),
        };
        let star = |bit: i32| i64::from(flags & bit != 0);
        Ok(i64::from(ints[0]) + i64::from(kwonly) + star(CO_VARARGS) + star(CO_VARKEYWORDS))
    }

    /// The text of an ASCII string type: CPython reads any byte (as
    /// Latin-1), PyPy only ASCII.
    fn ascii(&mut self, n: usize) -> Result<Kind, Bad> {
        let at = self.pos;
        let text = self.take(n, "a str")?;
        if !self.pypy {
            return Ok(Kind::Str);
        }
        match text.iter().position(|b| !b.is_ascii()) {
            Some(i) => Err(Bad::at(at + i, "an ASCII str that is not ASCII")),
            None => Ok(self.str_kind(text)),
        }
    }

    fn str_kind(&self, text: &[u8]) -> Kind {
        if self.pypy && text.contains(&0) {
            Kind::StrWithNul
        } else {
            Kind::Str
        }
    }

    /// `TYPE_LONG`: a signed count of 15-bit digits, least significant
    /// first, the last one nonzero.
    fn long(&mut self) -> Result<(), Bad> {
        let at = self.pos;
        let n = self.i32("an int")?;
        if n == 0 {
            return Ok(());
        }
        if n < -SIZE32_MAX {
            return Err(Bad::at(at, format!("an int of {n} digits")));
        }
        let digits = n.unsigned_abs() as usize;
        let start = self.pos;
        let bytes = self.take(digits.saturating_mul(2), "an int")?;
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            // 15-bit digits: the sign bit of the i16 marshal reads is clear.
            let digit = i16::from_le_bytes([pair[0], pair[1]]);
            if digit < 0 {
                return Err(Bad::at(start + 2 * i, "an int digit out of range"));
            }
            if digit == 0 && i == digits - 1 {
                return Err(Bad::at(start + 2 * i, "an int whose top digit is zero"));
            }
        }
        Ok(())
    }

    /// `TYPE_FLOAT` and each half of `TYPE_COMPLEX`: a length byte and the
    /// float's repr.
    fn float_str(&mut self) -> Result<(), Bad> {
        let n = self.byte("a float")?;
        let at = self.pos;
        let text = self.take(n.into(), "a float")?;
        let parses = std::str::from_utf8(text)
            .ok()
            .is_some_and(|s| s.parse::<f64>().is_ok());
        if !parses {
            return Err(Bad::at(at, "a float that is not a number"));
        }
        Ok(())
    }
}

/// Checks UTF-8 the way `bytes.decode('utf-8', 'surrogatepass')` does:
/// encoded surrogates (U+D800 to U+DFFF) are allowed. Returns the offset of
/// the first invalid byte.
fn check_utf8_surrogatepass(mut bytes: &[u8]) -> Result<(), usize> {
    let mut offset = 0;
    loop {
        match std::str::from_utf8(bytes) {
            Ok(_) => return Ok(()),
            Err(e) => {
                let bad = e.valid_up_to();
                // A surrogate is ED A0..BF 80..BF.
                match bytes.get(bad..bad + 3) {
                    Some([0xed, 0xa0..=0xbf, 0x80..=0xbf]) => {
                        bytes = &bytes[bad + 3..];
                        offset += bad + 3;
                    }
                    _ => return Err(offset + bad),
                }
            }
        }
    }
}

/// A loadable CPython 3.11 pyc of an empty module whose `co_filename` is
/// `name`, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_pyc(name: &str) -> Vec<u8> {
    let mut pyc = vec![0xa7, 0x0d, 0x0d, 0x0a, 3, 0, 0, 0];
    pyc.extend_from_slice(&[0; 8]);
    pyc.extend(tests::code_311(&[code::SMALL_TUPLE, 1, code::NONE], name));
    pyc
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC_311: [u8; 4] = [0xa7, 0x0d, 0x0d, 0x0a];

    fn pyc(body: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC_311.to_vec();
        bytes.extend_from_slice(&[3, 0, 0, 0]);
        bytes.extend_from_slice(&[7; 8]);
        bytes.extend_from_slice(body);
        bytes
    }

    fn short_str(s: &str) -> Vec<u8> {
        let mut v = vec![code::SHORT_ASCII, s.len() as u8];
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn bytes_obj(b: &[u8]) -> Vec<u8> {
        let mut v = vec![code::STRING];
        v.extend_from_slice(&(b.len() as i32).to_le_bytes());
        v.extend_from_slice(b);
        v
    }

    /// A minimal 3.11 code object with the given consts (a marshalled
    /// tuple) and filename.
    pub(super) fn code_311(consts: &[u8], filename: &str) -> Vec<u8> {
        code_311_locals(consts, filename, 0, &[], b"")
    }

    /// [`code_311`] taking `argcount` arguments, with these local names and
    /// their kinds.
    fn code_311_locals(
        consts: &[u8],
        filename: &str,
        argcount: i32,
        names: &[&str],
        kinds: &[u8],
    ) -> Vec<u8> {
        let mut v = vec![code::CODE];
        for n in [argcount, 0, 0, 1, 0] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend(bytes_obj(&[0x97, 0x00, 0x64, 0x00, 0x53, 0x00]));
        v.extend_from_slice(consts);
        v.extend_from_slice(&[code::SMALL_TUPLE, 0]);
        v.extend_from_slice(&[code::SMALL_TUPLE, names.len() as u8]);
        for name in names {
            v.extend(short_str(name));
        }
        v.extend(bytes_obj(kinds));
        v.extend(short_str(filename));
        v.extend(short_str("<module>"));
        v.extend(short_str("<module>"));
        v.extend_from_slice(&1i32.to_le_bytes());
        v.extend(bytes_obj(b""));
        v.extend(bytes_obj(b""));
        v
    }

    #[test]
    fn arguments_need_as_many_plain_locals() {
        let consts = [code::SMALL_TUPLE, 1, code::NONE];
        let code = |args, names: &[&str], kinds: &[u8]| {
            pyc(&code_311_locals(&consts, "m.py", args, names, kinds))
        };
        check_pyc(&code(1, &["x"], &[CO_FAST_LOCAL])).unwrap();
        check_pyc(&code(1, &["x", "y"], &[0x40, CO_FAST_LOCAL])).unwrap();
        // A cell variable is not a plain local.
        assert!(damaged(&code(1, &["x"], &[0x40])).contains("fewer local names than arguments"));
        assert!(damaged(&code(2, &["x", "y"], &[CO_FAST_LOCAL, 0x40]))
            .contains("fewer local names than arguments"));
        assert!(damaged(&code(1, &["x"], &[CO_FAST_LOCAL, CO_FAST_LOCAL]))
            .contains("more or fewer local kinds"));
    }

    fn damaged(bytes: &[u8]) -> String {
        match check_pyc(bytes) {
            Err(e @ BodyError::Damaged { .. }) => e.to_string(),
            other => panic!("expected damage, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_code_object_passes_and_every_truncation_fails() {
        let good = pyc(&code_311(&[code::SMALL_TUPLE, 1, code::NONE], "m.py"));
        assert_eq!(check_pyc(&good).unwrap().python(), "CPython 3.11");
        for cut in 0..good.len() {
            assert!(check_pyc(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(b'N');
        assert!(damaged(&trailing).contains("1 bytes after the code object"));
    }

    #[test]
    fn the_code_type_byte_followed_by_garbage_is_damage() {
        let message = damaged(&pyc(b"c\xde\xad\xbe\xef garbage garbage garbage"));
        assert!(message.contains("CPython 3.11"), "{message}");
        assert!(damaged(&pyc(b"")).contains("ends"));
        assert!(damaged(&pyc(b"N")).contains("None instead of a code object"));
    }

    #[test]
    fn unknown_magic_cannot_be_checked() {
        let mut bytes = pyc(b"garbage");
        bytes[..2].copy_from_slice(&3627u16.to_le_bytes());
        let err = check_pyc(&bytes).unwrap_err();
        assert!(!err.is_damage());
        assert!(err.to_string().contains("cannot check"), "{err}");
        assert!(check_pyc(b"ab").unwrap_err().is_damage());
        assert!(matches!(check_pyc(&[0; 40]), Err(BodyError::NotAPyc(_))));
    }

    #[test]
    fn bad_flags_are_damage() {
        let mut bytes = pyc(&code_311(&[code::SMALL_TUPLE, 0], "m.py"));
        bytes[4] = 4;
        assert_eq!(check_pyc(&bytes), Err(BodyError::BadFlags(4)));
    }

    #[test]
    fn references_must_name_complete_objects() {
        // (x, x) where the first is remembered: fine.
        let mut consts = vec![code::SMALL_TUPLE, 2, code::INT | code::FLAG_REF];
        consts.extend_from_slice(&5i32.to_le_bytes());
        consts.push(code::REF);
        consts.extend_from_slice(&0i32.to_le_bytes());
        check_pyc(&pyc(&code_311(&consts, "m.py"))).unwrap();
        // A reference past the table.
        let mut consts = vec![code::SMALL_TUPLE, 1, code::REF];
        consts.extend_from_slice(&3i32.to_le_bytes());
        assert!(damaged(&pyc(&code_311(&consts, "m.py"))).contains("back reference"));
        // A code object referring to itself while being read.
        let mut body = code_311(&[code::SMALL_TUPLE, 1, code::REF, 0, 0, 0, 0], "m.py");
        body[0] |= code::FLAG_REF;
        assert!(damaged(&pyc(&body)).contains("not complete"));
    }

    #[test]
    fn values_are_checked_as_marshal_does() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // An unnormalized long: top digit zero.
            (
                vec![code::SMALL_TUPLE, 1, code::LONG, 1, 0, 0, 0, 0, 0],
                "top digit",
            ),
            // A long digit with the high bit set.
            (
                vec![code::SMALL_TUPLE, 1, code::LONG, 1, 0, 0, 0, 0, 0x80],
                "out of range",
            ),
            // Invalid UTF-8.
            (
                vec![code::SMALL_TUPLE, 1, code::UNICODE, 1, 0, 0, 0, 0xff],
                "not UTF-8",
            ),
            // A negative size.
            (
                vec![code::SMALL_TUPLE, 1, code::STRING, 0xff, 0xff, 0xff, 0xff],
                "size -1",
            ),
            // A list as a frozenset item.
            (
                vec![
                    code::SMALL_TUPLE,
                    1,
                    code::FROZENSET,
                    1,
                    0,
                    0,
                    0,
                    code::LIST,
                    0,
                    0,
                    0,
                    0,
                ],
                "a list in a frozenset",
            ),
            // NULL inside a tuple.
            (vec![code::SMALL_TUPLE, 1, code::NULL], "NULL"),
            // An unknown type code.
            (vec![code::SMALL_TUPLE, 1, b'?'], "unknown type code 0x3f"),
            // A float that is not one.
            (
                vec![code::SMALL_TUPLE, 1, code::FLOAT, 3, b'a', b'b', b'c'],
                "not a number",
            ),
            // consts must be a tuple.
            (vec![code::NONE], "co_consts is None"),
        ];
        for (consts, says) in cases {
            let message = damaged(&pyc(&code_311(&consts, "m.py")));
            assert!(message.contains(says), "{says}: {message}");
        }
        // Encoded surrogates load (surrogatepass).
        let consts = [
            code::SMALL_TUPLE,
            1,
            code::UNICODE,
            3,
            0,
            0,
            0,
            0xed,
            0xa0,
            0x80,
        ];
        check_pyc(&pyc(&code_311(&consts, "m.py"))).unwrap();
        // A dict ends at a NULL key; a float repr parses.
        let mut consts = vec![code::SMALL_TUPLE, 2, code::DICT];
        consts.extend(short_str("k"));
        consts.extend_from_slice(&[code::NONE, code::NULL]);
        consts.extend_from_slice(&[code::FLOAT, 4, b'-', b'1', b'.', b'5']);
        check_pyc(&pyc(&code_311(&consts, "m.py"))).unwrap();
    }

    #[test]
    fn nesting_is_limited_without_exhausting_the_stack() {
        let nested = |depth: usize| {
            let mut consts = [code::SMALL_TUPLE, 1].repeat(depth);
            consts.push(code::NONE);
            pyc(&code_311(&consts, "m.py"))
        };
        // The code object and its consts tuple are two levels.
        let ok = nested(MAX_DEPTH as usize - 2);
        let deep = nested(MAX_DEPTH as usize - 1);
        let much_deeper = nested(100_000);
        // The parser keeps its own stack: a small thread stack is enough.
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                check_pyc(&ok).unwrap();
                assert!(damaged(&deep).contains("nested deeper"));
                assert!(damaged(&much_deeper).contains("nested deeper"));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn huge_declared_sizes_fail_without_allocating() {
        for ty in [
            code::TUPLE,
            code::LIST,
            code::SET,
            code::STRING,
            code::UNICODE,
        ] {
            let mut consts = vec![code::SMALL_TUPLE, 1, ty];
            consts.extend_from_slice(&i32::MAX.to_le_bytes());
            // What follows is read as items or text until something does not fit.
            damaged(&pyc(&code_311(&consts, "m.py")));
            damaged(&pyc(&consts));
        }
        let mut consts = vec![code::SMALL_TUPLE, 1, code::LONG];
        consts.extend_from_slice(&(-i32::MAX).to_le_bytes());
        assert!(damaged(&pyc(&code_311(&consts, "m.py"))).contains("ends"));
    }
}
