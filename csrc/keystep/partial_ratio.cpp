#include "partial_ratio.hpp"

#include <algorithm>
#include <limits>

namespace r1vl::keystep {
namespace {

// RapidFuzz's window score before ×100: 1 − dist / lensum.
double similarity(size_t lcs, size_t lensum) {
    if (lensum == 0) return 1.0;
    const size_t dist = lensum - 2 * lcs;
    return 1.0 - static_cast<double>(dist) / static_cast<double>(lensum);
}

bool reaches_threshold(double sim, double threshold) {
    const double score = (sim == 1.0) ? 100.0 : sim * 100.0;
    return score >= threshold;
}

// Smallest LCS with which a window of total length `lensum` reaches `threshold` (or SIZE_MAX if none).
size_t min_lcs(size_t lensum, size_t max_lcs, double threshold) {
    // score is monotone in lcs; start near the analytic root and step to the exact floating-point boundary.
    double guess = threshold * static_cast<double>(lensum) / 200.0;
    size_t l = guess <= 0 ? 0 : std::min(max_lcs, static_cast<size_t>(guess));
    while (l > 0 && reaches_threshold(similarity(l - 1, lensum), threshold)) --l;
    while (l <= max_lcs && !reaches_threshold(similarity(l, lensum), threshold)) ++l;
    return l <= max_lcs ? l : std::numeric_limits<size_t>::max();
}

}  // namespace

Needle::Needle(const u32string& s) : text_(s), size_(s.size()), words_((s.size() + 63) / 64) {
    for (char32_t c : s) alphabet_.add(c);
    const size_t width = alphabet_.size();
    masks_.assign(width * words_, 0);
    rmasks_.assign(width * words_, 0);
    counts_.assign(width, 0);
    for (size_t i = 0; i < size_; ++i) {
        const uint32_t cls = alphabet_(s[i]);
        masks_[cls * words_ + i / 64] |= uint64_t{1} << (i % 64);
        const size_t r = size_ - 1 - i;
        rmasks_[cls * words_ + r / 64] |= uint64_t{1} << (r % 64);
        ++counts_[cls];
    }
}

template <typename F>
bool Needle::scan_impl(const std::vector<uint64_t>& masks, const char32_t* h, size_t len, bool reversed, F&& f) const {
    // S has a zero bit for every matched needle column; LCS = zeros among the first size_ bits.
    std::vector<uint64_t> S(words_, ~uint64_t{0});
    const size_t tail_bits = size_ % 64;
    const uint64_t tail_mask = tail_bits ? (uint64_t{1} << tail_bits) - 1 : ~uint64_t{0};
    size_t lcs = 0;
    for (size_t k = 0; k < len; ++k) {
        const char32_t c = reversed ? h[len - 1 - k] : h[k];
        const uint32_t cls = alphabet_(c);
        if (cls != 0) {
            const uint64_t* M = &masks[cls * words_];
            uint64_t carry = 0;
            for (size_t w = 0; w < words_; ++w) {
                const uint64_t u = S[w] & M[w];
                const uint64_t sum = S[w] + u;
                const uint64_t x = sum + carry;
                carry = (sum < S[w]) || (x < sum);
                S[w] = x | (S[w] - u);
            }
            size_t ones = 0;
            for (size_t w = 0; w + 1 < words_; ++w) ones += __builtin_popcountll(S[w]);
            ones += __builtin_popcountll(S[words_ - 1] & tail_mask);
            lcs = size_ - ones;
        }
        if (f(k + 1, lcs)) return true;
    }
    return false;
}

template <typename F>
bool Needle::scan_prefixes(const char32_t* h, size_t max_len, bool reversed, F&& f) const {
    return scan_impl(reversed ? rmasks_ : masks_, h, max_len, reversed, f);
}

size_t Needle::lcs(const char32_t* h, size_t len) const {
    size_t result = 0;
    scan_impl(masks_, h, len, false, [&](size_t, size_t l) { result = l; return false; });
    return result;
}

double Needle::best_similarity(const u32string& hay) const {
    const size_t m = size_, n = hay.size();
    if (m == 0) return n == 0 ? 1.0 : 0.0;
    double best = 0.0;
    // prefix windows hay[:i], 1 <= i < m
    scan_prefixes(hay.data(), std::min(m - 1, n), false, [&](size_t len, size_t l) {
        best = std::max(best, similarity(l, m + len));
        return best == 1.0;
    });
    // full windows hay[i:i+m]
    for (size_t i = 0; i + m <= n && best < 1.0; ++i) best = std::max(best, similarity(lcs(hay.data() + i, m), 2 * m));
    // suffix windows hay[n-len:], 1 <= len < m
    if (best < 1.0 && n >= 1)
        scan_prefixes(hay.data() + (n - std::min(m - 1, n)), std::min(m - 1, n), true, [&](size_t len, size_t l) {
            best = std::max(best, similarity(l, m + len));
            return best == 1.0;
        });
    return best;
}

bool Needle::reaches(const u32string& hay, double threshold) const {
    const size_t m = size_, n = hay.size();
    if (m == 0) return reaches_threshold(n == 0 ? 1.0 : 0.0, threshold);
    const size_t kNever = std::numeric_limits<size_t>::max();
    const size_t edge = std::min(m - 1, n);
    // Edge windows (shorter than the needle) at both ends: one incremental pass each.
    auto edge_hit = [&](size_t len, size_t l) {
        const size_t need = min_lcs(m + len, std::min(m, len), threshold);
        return need != kNever && l >= need;
    };
    if (edge && scan_prefixes(hay.data(), edge, false, edge_hit)) return true;
    if (edge && scan_prefixes(hay.data() + (n - edge), edge, true, edge_hit)) return true;
    if (n < m) return false;
    // Full windows: LCS <= |multiset intersection|, maintained while sliding; verify only windows that pass.
    const size_t need = min_lcs(2 * m, m, threshold);
    if (need == kNever) return false;
    if (need == 0) return true;
    std::vector<uint32_t> window(counts_.size(), 0);
    size_t common = 0;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t in = alphabet_(hay[i]);
        if (in && window[in]++ < counts_[in]) ++common;
        if (i >= m) {
            const uint32_t out = alphabet_(hay[i - m]);
            if (out && --window[out] < counts_[out]) --common;
        }
        if (i + 1 >= m && common >= need && lcs(hay.data() + (i + 1 - m), m) >= need) return true;
    }
    return false;
}

double partial_ratio(const u32string& a, const u32string& b) {
    if (a.empty() && b.empty()) return 100.0;
    if (a.empty() || b.empty()) return 0.0;
    const bool a_shorter = a.size() <= b.size();
    const u32string& shorter = a_shorter ? a : b;
    const u32string& longer = a_shorter ? b : a;
    double best = Needle(shorter).best_similarity(longer);
    if (best != 1.0 && a.size() == b.size()) best = std::max(best, Needle(longer).best_similarity(shorter));
    return best == 1.0 ? 100.0 : best * 100.0;
}

bool partial_ratio_reaches(const Needle& needle, const u32string& hay, double threshold) {
    if (needle.size() == 0 || hay.empty()) return reaches_threshold(needle.size() == hay.size() ? 1.0 : 0.0, threshold);
    if (needle.size() < hay.size()) return needle.reaches(hay, threshold);
    if (needle.size() > hay.size()) return Needle(hay).reaches(needle.text(), threshold);
    return needle.reaches(hay, threshold) || Needle(hay).reaches(needle.text(), threshold);
}

}  // namespace r1vl::keystep
