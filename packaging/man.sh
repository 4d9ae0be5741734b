#!/usr/bin/env bash
# Writes cachette(1), a man page made of the --help of `cachette` and of every subcommand (found
# recursively from the "Subcommands:" sections), so the page and --help never disagree.
# Usage: man.sh CACHETTE_BINARY VERSION OUTPUT (run by packaging/CMakeLists.txt at build time)
set -euo pipefail
bin=$1
version=$2
exec >"$3.tmp"
trap 'rm -f "$3.tmp"' ERR

# roff: a backslash is \e; a line starting with . or ' would be a request, so \& goes first.
roff_text() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"; }

section() {
  local out subs
  out=$("$bin" "$@" --help | sed "s|^Usage: [^ ]*|Usage: cachette|")
  if (($# > 0)); then printf '.SS "cachette %s"\n' "$*"; fi
  printf '.nf\n'
  roff_text <<<"$out"
  printf '.fi\n'
  subs=$(awk '/^Subcommands:/ { on = 1; next }
              on && /^  [a-z]/ { print $1 }
              on && /^$/ { on = 0 }' <<<"$out")
  for s in $subs; do section "$@" "$s"; done
}

cat <<HEAD
.TH CACHETTE 1 "" "cachette $version" "User Commands"
.SH NAME
cachette \\- an LLM inference server whose heart is a KV-cache engine
.SH SYNOPSIS
.B cachette
.I subcommand
[\\fIoptions\\fR]
.SH DESCRIPTION
The OpenAI-compatible server (\\fBcachette serve\\fR), its tools, and its tiered KV cache (RAM,
local disk, Redis). \\fBcachette serve \\-\\-config\\fR \\fIFILE\\fR reads the same settings as
TOML (keys are the flag names with _ for \\-); the Debian package runs it as the systemd unit
\\fBcachette.service\\fR with \\fI/etc/cachette/serve.toml\\fR. Without \\fB\\-m\\fR, commands use
the bundled model, \\fIshare/cachette/models/cachette\\-tiny\\-q8_0.gguf\\fR beside the
installed binary, or \\fB\$CACHETTE_MODEL\\fR.
.SH COMMANDS
HEAD
section
cat <<'TAIL'
.SH ENVIRONMENT
.TP
.B CACHETTE_MODEL
The model used where a command is given no \-m.
.TP
.B CACHETTE_LOG
debug, info (the default), warning or error: the least severe log lines printed. Another value
is taken as info, with a warning.
.TP
.B CACHETTE_ISA
scalar, avx2, avx512 or amx: the highest kernel level used, at most what the processor has
(for measuring a lower level's kernels; every level gives the same bits). Another value is
ignored with a warning.
.TP
.B CACHETTE_Q8_DECODE
rows or step: the order in which the AVX2 level's Q8_0 decode tile reads its 8 rows (one after
another, or block by block in step; the same bits) where they are in the file's layout (rows
interleaved by 8, see CACHETTE_WEIGHT_LAYOUT, are read in step). The default is step, the
faster on every processor measured. Another value is ignored with a warning.
.TP
.B CACHETTE_WEIGHT_LAYOUT
rows or interleaved: how Q8_0 and Q4_0 weights read into memory of their own (huge-pages) are
laid out at the AVX2 level: as in the file, or rows in groups of 8 with their blocks
interleaved, which a decode step streams faster (the same bits). The default is interleaved.
Another value is ignored with a warning.
.TP
.B CACHETTE_WEIGHTS
mmap or huge-pages: where a loaded model's weights live. mmap maps the GGUF file (shared with
the page cache and other processes, paged in on first touch); huge-pages reads it at load into
memory of its own on 2 MiB pages, which a decode step, streaming every weight, reads faster.
Unset: huge-pages where transparent huge pages are "always" or "madvise" and the file takes at
most half of MemAvailable, else mmap. Another value is an error.
.SH EXIT STATUS
0 on success; 1 when a command fails (the reason is printed as "error: ..."); other non-zero
values for command-line errors (an unknown flag, a missing \-\-config file).
.SH SEE ALSO
The README, docs/serving.md and docs/c-api.md of the cachette sources.
TAIL
mv "$3.tmp" "$3"
