// Aho–Corasick over code points with a compressed alphabet: every character that occurs in no pattern
// shares class 0, so the transition table is (states × pattern alphabet) and a scan is one table lookup
// per text character, linear in the text whatever the patterns. Each state carries the bitmask of the
// groups whose patterns end there (own and via failure links), so a scan only ORs masks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "unicode.hpp"

namespace r1vl::keystep {

// Maps a code point to a small class index; 0 = "in no pattern".
class Alphabet {
public:
    uint32_t add(char32_t c);  // returns the class, creating one if needed
    uint32_t size() const { return n_classes_; }
    uint32_t operator()(char32_t c) const {
        if (c < 128) return ascii_[c];
        if (other_.empty()) return 0;
        auto it = std::lower_bound(other_.begin(), other_.end(), std::make_pair(c, uint32_t{0}));
        return (it != other_.end() && it->first == c) ? it->second : 0;
    }

private:
    uint32_t ascii_[128] = {};
    std::vector<std::pair<char32_t, uint32_t>> other_;  // sorted
    uint32_t n_classes_ = 1;
};

class AhoCorasick {
public:
    // Each pattern reports its group (< n_groups); empty patterns are not allowed here.
    void build(const std::vector<std::pair<u32string, uint32_t>>& patterns, uint32_t n_groups);
    bool empty() const { return n_states_ <= 1; }

    // Running state of one scan: the automaton state (a row offset in dense tables) and the groups found.
    struct Cursor {
        uint32_t state = 0;
        uint64_t* found = nullptr;  // mask_words() words
    };

    // True when texts can be scanned as class sequences (see classes_of / scan_classes).
    bool lane_scannable() const { return (!rows16_.empty() || !rows32_.empty()) && width_ <= 65535; }

    // The class of every character of s (code points, or Latin-1 bytes read as code points).
    template <typename CharT>
    void classes_of(const CharT* s, size_t n, std::vector<uint16_t>& out) const {
        const size_t at = out.size();
        out.resize(at + n);
        uint16_t* dst = out.data() + at;
        for (size_t i = 0; i < n; ++i) dst[i] = static_cast<uint16_t>(class_of(s[i]));
    }

    // ORs into `found` the groups of every pattern occurring in the class sequence. Long inputs are cut into
    // lanes that overlap by (longest pattern − 1) and are scanned together, so the per-character chains of
    // dependent loads overlap in time; every occurrence lies wholly inside some lane.
    void scan_classes(const uint16_t* cls, size_t n, uint64_t* found) const {
        if (!rows16_.empty()) {
            scan_lanes(rows16_.data(), cls, n, found);
        } else {
            scan_lanes(rows32_.data(), cls, n, found);
        }
    }

    // Feeds s[0, n) (code points, or Latin-1 bytes read as code points) through the automaton.
    template <typename CharT>
    void feed(const CharT* s, size_t n, Cursor& cur) const {
        if (empty()) return;
        if (!rows16_.empty()) {
            feed_dense(rows16_.data(), s, n, cur);
        } else if (!rows32_.empty()) {
            feed_dense(rows32_.data(), s, n, cur);
        } else {
            feed_sparse(s, n, cur);
        }
    }

    // Dense tables above this many entries fall back to sparse edges + failure links (still linear).
    static constexpr size_t kMaxDenseEntries = size_t{1} << 22;

private:
    template <typename CharT>
    uint32_t class_of(CharT c) const {
        if constexpr (sizeof(CharT) == 1) {
            return byte_class_[c];
        } else {
            return alphabet_(static_cast<char32_t>(c));
        }
    }

    // Dense: each entry is the next state's row offset (state << shift_), so the dependent chain per
    // character is one add and one load; the state index (for the output masks) is a shift off that chain.
    template <typename T, typename CharT>
    void feed_dense(const T* rows, const CharT* s, size_t n, Cursor& cur, bool already_classes = false) const {
        uint32_t row = cur.state;
        const uint64_t* out = out_.data();
        const unsigned shift = shift_;
        if (words_ == 1) {
            uint64_t found = cur.found[0];
            if (already_classes) {
                for (size_t i = 0; i < n; ++i) {
                    row = rows[row + static_cast<uint32_t>(s[i])];
                    found |= out[row >> shift];
                }
            } else {
                for (size_t i = 0; i < n; ++i) {
                    row = rows[row + class_of(s[i])];
                    found |= out[row >> shift];
                }
            }
            cur.found[0] = found;
        } else {
            for (size_t i = 0; i < n; ++i) {
                row = rows[row + (already_classes ? static_cast<uint32_t>(s[i]) : class_of(s[i]))];
                const uint64_t* o = out + (row >> shift) * words_;
                for (size_t w = 0; w < words_; ++w) cur.found[w] |= o[w];
            }
        }
        cur.state = row;
    }

    template <typename T>
    void scan_lanes(const T* rows, const uint16_t* cls, size_t n, uint64_t* found) const {
        if (empty()) return;
        constexpr size_t kLanes = 4;
        const size_t overlap = max_pattern_ ? max_pattern_ - 1 : 0;
        const uint64_t* out = out_.data();
        const unsigned shift = shift_;
        size_t done = 0;  // [0, done) is covered by the lanes
        if (words_ == 1 && n >= 64 * kLanes && n / kLanes > 4 * overlap) {
            const size_t chunk = n / kLanes;
            size_t start[kLanes];
            for (size_t j = 0; j < kLanes; ++j) start[j] = j == 0 ? 0 : j * chunk - overlap;
            const size_t len = chunk + overlap;  // lanes 1..K-1; lane 0 runs `chunk` then continues below
            uint32_t row[kLanes] = {0, 0, 0, 0};
            uint64_t f0 = 0, f1 = 0, f2 = 0, f3 = 0;
            for (size_t i = 0; i < chunk; ++i) {
                row[0] = rows[row[0] + cls[start[0] + i]];
                row[1] = rows[row[1] + cls[start[1] + i]];
                row[2] = rows[row[2] + cls[start[2] + i]];
                row[3] = rows[row[3] + cls[start[3] + i]];
                f0 |= out[row[0] >> shift];
                f1 |= out[row[1] >> shift];
                f2 |= out[row[2] >> shift];
                f3 |= out[row[3] >> shift];
            }
            for (size_t i = chunk; i < len; ++i) {  // the overlap of lanes 1..3
                row[1] = rows[row[1] + cls[start[1] + i]];
                row[2] = rows[row[2] + cls[start[2] + i]];
                row[3] = rows[row[3] + cls[start[3] + i]];
                f1 |= out[row[1] >> shift];
                f2 |= out[row[2] >> shift];
                f3 |= out[row[3] >> shift];
            }
            found[0] |= f0 | f1 | f2 | f3;
            done = start[kLanes - 1] + len;  // == kLanes * chunk
            // the tail restarts from the root `overlap` characters early, like a lane
            const size_t from = done - overlap;
            Cursor cur{0, found};
            feed_dense(rows, cls + from, n - from, cur, true);
            return;
        }
        Cursor cur{0, found};
        feed_dense(rows, cls, n, cur, true);
    }

    template <typename CharT>
    void feed_sparse(const CharT* s, size_t n, Cursor& cur) const {
        uint32_t state = cur.state;
        for (size_t i = 0; i < n; ++i) {
            state = sparse_step(state, class_of(s[i]));
            const uint64_t* o = &out_[static_cast<size_t>(state) * words_];
            for (size_t w = 0; w < words_; ++w) cur.found[w] |= o[w];
        }
        cur.state = state;
    }

    template <typename T>
    void build_dense(const std::vector<std::pair<u32string, uint32_t>>& patterns, size_t max_states,
                     std::vector<T>& rows);
    void build_sparse(const std::vector<std::pair<u32string, uint32_t>>& patterns);
    uint32_t goto_edge(uint32_t state, uint32_t cls) const;  // child or kNone
    uint32_t sparse_step(uint32_t state, uint32_t cls) const;
    static constexpr uint32_t kNone = 0xFFFFFFFFu;

    Alphabet alphabet_;
    uint32_t byte_class_[256] = {};  // class of each Latin-1 character (texts arrive lower-cased)
    uint32_t width_ = 1, n_states_ = 0;
    unsigned shift_ = 0;               // rows are 1 << shift_ entries wide (>= width_)
    size_t words_ = 1;
    size_t max_pattern_ = 0;           // longest pattern, in characters
    std::vector<uint16_t> rows16_;     // dense transitions when every row offset fits 16 bits
    std::vector<uint32_t> rows32_;     // dense transitions otherwise (if small enough)
    std::vector<uint64_t> out_;        // n_states × words_: groups ending in each state
    // sparse fallback
    std::vector<uint32_t> edge_begin_;
    std::vector<std::pair<uint32_t, uint32_t>> edges_;  // (class, child), sorted per state
    std::vector<uint32_t> fail_;
};

}  // namespace r1vl::keystep
