// Batched key-step matching: for every text, which of its sample's key-step groups has an alternative
// present. Pure C++ (no Python); the binding converts types and releases the GIL around match_batch.
#pragma once

#include <cstdint>
#include <functional>
#include <atomic>
#include <memory>
#include <vector>

#include "aho_corasick.hpp"
#include "partial_ratio.hpp"
#include "qgram.hpp"

namespace r1vl::keystep {

enum class Mode : int { kR1VL = 0, kNormalized = 1, kFuzzy = 2 };
enum class Scope : int { kSteps = 0, kAll = 1 };

// One sample's key steps as given: groups of equivalent alternatives, every alternative back to back.
struct GroupList {
    u32string chars;
    std::vector<uint32_t> alt_end;    // alternative k is chars[k ? alt_end[k - 1] : 0, alt_end[k])
    std::vector<uint32_t> group_end;  // group g is alternatives [g ? group_end[g - 1] : 0, group_end[g])

    uint32_t n_groups() const { return static_cast<uint32_t>(group_end.size()); }
    void end_alternative() { alt_end.push_back(static_cast<uint32_t>(chars.size())); }
    void end_group() { group_end.push_back(static_cast<uint32_t>(alt_end.size())); }
};

// One sample's key steps, prepared once for its mode.
struct KeySteps {
    uint32_t n_groups = 0;
    std::vector<uint8_t> always;     // group matched by every text (the released code's empty alternative)
    std::vector<uint8_t> matchable;  // group has at least one usable alternative
    uint32_t n_matchable = 0;
    Patterns patterns;                               // prepared alternatives and their groups
    QGramFilter filter;                              // the exact search, when the set is small
    std::vector<std::pair<Needle, uint32_t>> fuzzy;  // fuzzy mode: (alternative, group)

    // The exact search for large sets, and the fallback when the filter's verification budget runs out.
    // Built on first use (thread-safe): most samples never need it.
    const AhoCorasick& automaton() const;

    KeySteps() = default;
    KeySteps(KeySteps&& other) noexcept;
    KeySteps& operator=(KeySteps&& other) noexcept;
    ~KeySteps();

private:
    // Allocated on first use only: an automaton is ~2 KB even when empty.
    mutable std::atomic<AhoCorasick*> automaton_{nullptr};
};

KeySteps compile(const GroupList& groups, Mode mode, size_t min_alt_len);

struct Options {
    Mode mode = Mode::kR1VL;
    Scope scope = Scope::kSteps;
    double fuzzy_threshold = 90.0;
    int threads = 0;  // 0 = one per core (never more than the work warrants)
};

// matched[i] = number of groups of *key_steps[i] found in texts[i]; group_flags (optional) receives
// key_steps[i]->n_groups bytes per text, back to back.
void match_batch(const std::vector<TextView>& texts, const std::vector<const KeySteps*>& key_steps,
                 const Options& options, int32_t* matched, uint8_t* group_flags);

// Text as matched in `mode` (scope applied, then lower-cased or normalised).
void prepare_text(const TextView& text, Mode mode, Scope scope, u32string& out, u32string& tmp1, u32string& tmp2);

// Runs f(i) for i in [0, n) on up to `threads` threads (0 = hardware concurrency); rethrows the first error.
void parallel_for(size_t n, int threads, size_t min_per_thread, const std::function<void(size_t)>& f);

}  // namespace r1vl::keystep
