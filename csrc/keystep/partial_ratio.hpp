// Fuzzy presence with the scores of RapidFuzz's fuzz.partial_ratio: the best normalised Indel similarity
// (100 · (1 − dist / (len1 + len2)), dist = len1 + len2 − 2·LCS) between the shorter string and every
// window of the longer one (full-length windows, and the shorter prefix/suffix windows at either end);
// for equal lengths both directions count. LCS is computed bit-parallel (Allison–Dix/Hyyrö), 64 columns
// per machine word.
#pragma once

#include <cstdint>
#include <vector>

#include "aho_corasick.hpp"

namespace r1vl::keystep {

// A needle prepared for bit-parallel LCS against many haystacks.
class Needle {
public:
    Needle() = default;
    explicit Needle(const u32string& s);

    size_t size() const { return size_; }
    const u32string& text() const { return text_; }

    // LCS(needle, h[0:len]) for every prefix length len (1..max_len), via callback(len, lcs) -> stop?
    template <typename F>
    bool scan_prefixes(const char32_t* h, size_t max_len, bool reversed, F&& f) const;
    size_t lcs(const char32_t* h, size_t len) const;

    // Is partial_ratio(needle, haystack) >= threshold, counting only windows of `haystack`? (needle no longer)
    bool reaches(const u32string& haystack, double threshold) const;
    // max over the windows of `haystack` (needle no longer than haystack), in [0, 1] as RapidFuzz before ×100
    double best_similarity(const u32string& haystack) const;

private:
    template <typename F>
    bool scan_impl(const std::vector<uint64_t>& masks, const char32_t* h, size_t len, bool reversed, F&& f) const;

    u32string text_;
    size_t size_ = 0, words_ = 0;
    Alphabet alphabet_;
    std::vector<uint64_t> masks_, rmasks_;  // (alphabet × words): bit i set where needle[i] (reversed: needle[m-1-i])
    std::vector<uint32_t> counts_;          // occurrences of each class in the needle
};

// RapidFuzz's fuzz.partial_ratio(a, b) (no processor, no cutoff).
double partial_ratio(const u32string& a, const u32string& b);

// partial_ratio(needle.text(), haystack) >= threshold, decided without computing every window's score.
bool partial_ratio_reaches(const Needle& needle, const u32string& haystack, double threshold);

}  // namespace r1vl::keystep
