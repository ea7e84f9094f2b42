//! What the fuzz targets share: the relay's default configuration, and the input layout of
//! the targets that feed a byte stream to an incremental decoder.
//!
//! An input is `[knob, n, len_1 .. len_n, stream...]`: `knob` picks the target's limits, and the
//! stream is handed to the decoder in pieces of `len_1 + 1`, `len_2 + 1`, ... bytes, cycling,
//! so one corpus entry exercises both one whole read and arbitrary read boundaries (a head or a
//! frame header cut anywhere). `n` is taken modulo [`MAX_SPLITS`] + 1; `n = 0` means one read.

use std::sync::OnceLock;

use pulsar_relay::config::{self, Cli, Config};

/// The built-in defaults, loaded once per process: the limits the server runs with.
pub fn relay_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| config::load(&Cli::default(), &|_| None).expect("built-in defaults"))
}

/// Most chunk lengths an input may give.
pub const MAX_SPLITS: usize = 8;

/// A fuzz input taken apart.
#[derive(Debug, Clone, Copy)]
pub struct SplitInput<'a> {
    /// Chooses the limits (each target documents its table).
    pub knob: u8,
    /// Chunk lengths minus one; empty for a single read.
    pub lens: &'a [u8],
    /// The bytes a peer sends.
    pub stream: &'a [u8],
}

impl<'a> SplitInput<'a> {
    /// `None` when the input is too short to hold its own header.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&knob, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n) % (MAX_SPLITS + 1);
        if rest.len() < n {
            return None;
        }
        let (lens, stream) = rest.split_at(n);
        Some(SplitInput { knob, lens, stream })
    }

    /// The stream in the pieces the lengths say (the whole stream if there are none).
    pub fn pieces(&self) -> Pieces<'a> {
        Pieces {
            rest: self.stream,
            lens: self.lens,
            next: 0,
        }
    }
}

/// Iterator over the read-sized pieces of a stream.
#[derive(Debug, Clone)]
pub struct Pieces<'a> {
    rest: &'a [u8],
    lens: &'a [u8],
    next: usize,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let len = match self.lens.get(self.next % self.lens.len().max(1)) {
            Some(&len) => usize::from(len) + 1,
            None => self.rest.len(),
        };
        self.next += 1;
        let (piece, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        Some(piece)
    }
}
