// Static rANS entropy coder of the cachegen codec (docs/formats/codecs.md, "Stream"): 32-bit
// states, byte-wise renormalization, frequencies summing to 2^8, four interleaved states.
// Written here from Duda's description of asymmetric numeral systems and Giesen's notes on
// interleaved byte-wise rANS.
//
// Symbols are small integers lo .. lo + n - 1 of a table. A stream is a sequence of *runs*, each
// coded with one table; symbol j of a run (counting from 0 in each run) uses state j % 4, so the
// decoder's hot loop takes four independent symbols at a time from one table (the four state
// updates overlap in the CPU instead of waiting on each other).
//
// The encoder is a stack: runs are given to it last first, and each run's symbols last first
// (EncodeRun does the latter itself); the decoder then reads the runs first to last.
//
// Thread-safety: an Encoder or Decoder belongs to one thread; tables are read-only once built.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "cachette/status.h"

namespace cachette::cache::codecs::rans {

inline constexpr int kProbBits = 8;
inline constexpr uint32_t kProbScale = 1u << kProbBits;  // frequencies of a table sum to this
inline constexpr uint32_t kStateLow = 1u << 23;          // L: a state is in [L, 2^31)
inline constexpr int kStates = 4;
inline constexpr size_t kStreamHeaderBytes = 4 * kStates;  // the initial states, u32 each
// The most symbols a table may have: symbol indices are bytes.
inline constexpr int kMaxSymbols = 255;

// Normalizes raw counts into freq[0, n): n in [1, kMaxSymbols], counts summing to `total` > 0.
// f = 0 for a count of 0, else max(1, floor(count * 2^P / total)); then the first largest
// frequency takes the shortfall, or gives up the excess (repeatedly, down to 1), so the sum is
// exactly kProbScale. Encoder and decoder both run this on the stored counts, so it is part of
// the format.
void NormalizeCounts(const uint64_t* counts, int n, uint64_t total, uint16_t* freq);

// The symbols lo .. lo + n - 1 with their frequencies (summing to kProbScale; a symbol of
// frequency 0 cannot be coded) and cumulative starts: what the encoder needs.
struct Table {
  int lo = 0;
  int n = 0;
  uint16_t freq[kMaxSymbols];
  uint16_t start[kMaxSymbols];  // freq[0] + ... + freq[i - 1]
  // x / freq[i] == (x * reciprocal[i]) >> 40 for every state x < 2^31: the encoder's divisions
  // become multiplications.
  uint64_t reciprocal[kMaxSymbols];

  void Build(int lo, int n, const uint16_t* freq);
};

// A table expanded for decoding: one packed entry per slot, so a symbol costs one lookup and
// no division. About 1 KiB, rebuilt per run, so it stays in L1.
struct DecodeTable {
  // Build (and its vector twins) fills each symbol's slots in whole blocks of kFillBlock,
  // writing up to kFillBlock entries past its last slot (the next symbol's, which it then
  // overwrites, or the padding): a block is a few vector stores.
  static constexpr uint32_t kFillBlock = 16;

  // One symbol has every slot (`single_symbol`): decoding it is a no-op on the state.
  bool single = false;
  int single_symbol = 0;
  // Per slot: its symbol (bits 0-7), its frequency (bits 8-19) and slot - start (bits 20-31),
  // for x' = freq * (x >> P) + (slot - start). Entries from kProbScale on are scratch.
  uint32_t entry[kProbScale + kFillBlock];

  void Build(int lo, int n, const uint16_t* freq);
};

class Encoder {
 public:
  Encoder();

  // Encodes symbols[j * stride] for j = n - 1 down to 0, symbol j on state j % 4. Every
  // symbol must be within the table's range with a nonzero frequency (CT_CHECK: the caller
  // built the table from these very symbols).
  void EncodeRun(const Table& table, const int8_t* symbols, size_t n, size_t stride);

  // Appends the stream to `out`: the four states (u32 LE), then the bytes in decoding order.
  // The encoder is spent afterwards.
  void Finish(std::vector<std::byte>& out);

 private:
  uint32_t x_[kStates];
  std::vector<uint8_t> reversed_;  // emitted bytes, last byte the decoder reads first
};

class Decoder {
 public:
  // kCorruption unless `stream` holds the four initial states, each in [L, 2^31). Borrows
  // `stream`, which must outlive the decoder.
  Status Open(std::span<const std::byte> stream);

  // Decodes the n symbols of one run with `table` into out[j * stride]. False if the stream
  // ends before they are all decoded (a corrupt or truncated stream); never reads past it.
  // The plain loop: DecodeRuns is the fast one, and rans_test checks one against the other.
  bool DecodeRun(const DecodeTable& table, size_t n, int8_t* out, size_t stride);

  // DecodeRun on k streams at once, k in [1, kMaxLockstep]: decs[i] decodes n symbols with
  // tables[i] (k tables side by side) into outs[i][j * stride]. Independent streams whose runs
  // have the same lengths (the planes of a cachegen chunk) give the CPU 4k state updates to
  // overlap instead of 4. Each stream ends exactly as DecodeRun would leave it, bytes and
  // states. False if some stream ends before its n symbols (the decoders' positions are then
  // unspecified); never reads past a stream. The portable loop; cachegen_kernels.h has AVX2
  // and AVX-512 ones.
  static constexpr int kMaxLockstep = 16;
  static bool DecodeRuns(Decoder* const* decs, const DecodeTable* tables, int k, size_t n,
                         int8_t* const* outs, size_t stride);

  // Where a decoder stands: its states, its next byte and its stream's end. For loops over
  // several decoders outside this file (the vector ones), which take a position, advance it by
  // the rules above, and set it back.
  struct Position {
    uint32_t x[kStates];
    const uint8_t* p;
    const uint8_t* end;
  };
  Position position() const;
  // `pos` must come from position() of this decoder, advanced within the same stream.
  void set_position(const Position& pos);

  // True when every state is back at L and every byte has been read: the mirror image of the
  // encoder's start. A stream that decodes but ends otherwise is corrupt.
  bool AtEnd() const;

 private:
  // DecodeRuns for k = K (defined and instantiated in rans.cc only).
  template <int K>
  static bool DecodeRunsOf(Decoder* const* decs, const DecodeTable* tables, size_t n,
                           int8_t* const* outs, size_t stride);

  uint32_t x_[kStates] = {};
  const uint8_t* p_ = nullptr;
  const uint8_t* end_ = nullptr;
};

}  // namespace cachette::cache::codecs::rans
