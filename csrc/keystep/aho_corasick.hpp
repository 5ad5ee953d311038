// Aho–Corasick over code points with a compressed alphabet: every character that occurs in no pattern
// shares class 0, so the dense transition table is (states × pattern alphabet) and a scan is one table
// lookup per text character, linear in the text whatever the patterns.
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
    std::vector<std::pair<char32_t, uint32_t>> other_;
    uint32_t n_classes_ = 1;
};

class AhoCorasick {
public:
    // Each pattern reports its `group`; empty patterns are not allowed here.
    void build(const std::vector<std::pair<u32string, uint32_t>>& patterns);
    bool empty() const { return n_states_ <= 1; }

    // Calls on_group(g) for the groups of every pattern ending at each position; stops when it returns true.
    template <typename F>
    void scan(const char32_t* text, size_t n, F&& on_group) const {
        if (empty()) return;
        const uint32_t width = alphabet_.size();
        const bool dense = !delta_.empty();
        uint32_t state = 0;
        for (size_t i = 0; i < n; ++i) {
            const uint32_t cls = alphabet_(text[i]);
            state = dense ? delta_[static_cast<size_t>(state) * width + cls] : sparse_step(state, cls);
            const uint32_t b = out_begin_[state], e = out_begin_[state + 1];
            for (uint32_t k = b; k < e; ++k)
                if (on_group(out_groups_[k])) return;
        }
    }

    // Dense tables above this many entries fall back to sparse edges + failure links (still linear).
    static constexpr size_t kMaxDenseEntries = size_t{1} << 22;

private:
    uint32_t goto_edge(uint32_t state, uint32_t cls) const;  // child or kNone
    uint32_t sparse_step(uint32_t state, uint32_t cls) const;
    static constexpr uint32_t kNone = 0xFFFFFFFFu;

    Alphabet alphabet_;
    uint32_t n_states_ = 0;
    std::vector<uint32_t> edge_begin_;  // n_states + 1 offsets into edges_ (trie edges sorted by class)
    std::vector<std::pair<uint32_t, uint32_t>> edges_;  // (class, child)
    std::vector<uint32_t> fail_;
    std::vector<uint32_t> delta_;       // n_states × alphabet when small enough, else empty
    std::vector<uint32_t> out_begin_;   // n_states + 1 offsets into out_groups_
    std::vector<uint32_t> out_groups_;  // groups reported in each state (own and via dictionary links), deduplicated
};

}  // namespace r1vl::keystep
