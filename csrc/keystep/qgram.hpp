// Presence search for one sample's key steps (a few dozen short patterns): a q-gram filter.
//
// Every pattern is keyed by its first q characters, q = min(4, shortest pattern) (at least 2: a set with a
// one-character pattern is left to Aho–Corasick). A 4096-bit Bloom filter (two bits per
// key, 512 bytes, always in L1) marks the keys, so almost every text position costs one multiply and a bit
// test (about 2% of positions a second one), with no
// dependent chain of loads from one position to the next (unlike an automaton walk). A marked position is
// verified against the patterns of its bucket, skipping groups already found, and the scan stops once every
// group is found. Verification work is capped at a small multiple of the text length: past the cap `scan`
// returns false and the caller rescans with Aho–Corasick, so matching stays linear in the text whatever
// the input (an adversary can only make us pay the cap, then the automaton).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "unicode.hpp"

namespace r1vl::keystep {

// Prepared key-step alternatives, each with its group, back to back in one buffer (a few allocations per
// sample instead of one per alternative).
struct Patterns {
    u32string chars;
    std::vector<uint32_t> end;    // pattern k is chars[k ? end[k - 1] : 0, end[k])
    std::vector<uint32_t> group;  // its group

    size_t size() const { return end.size(); }
    size_t begin(size_t k) const { return k ? end[k - 1] : 0; }
    size_t length(size_t k) const { return end[k] - begin(k); }
    const char32_t* data(size_t k) const { return chars.data() + begin(k); }
    void add(const u32string& pattern, uint32_t g) {
        chars += pattern;
        end.push_back(static_cast<uint32_t>(chars.size()));
        group.push_back(g);
    }
};

class QGramFilter {
public:
    static constexpr size_t kMaxPatterns = 256;  // beyond this the table fills up; Aho–Corasick is better
    static constexpr unsigned kBits = 12;        // 2^12-bit table
    static constexpr size_t kMaxQ = 4;

    // Builds the filter (once, on a fresh object); returns false and leaves it unusable when the set is too
    // large, or has a one-character pattern. Patterns must be non-empty;
    // a group's patterns should be adjacent (as compile() lays them out).
    bool build(const Patterns& patterns);
    bool usable() const { return usable_; }

    // ORs into `found` ((n_groups + 63) / 64 words) the groups having a pattern in s[0, n). Returns false
    // when the verification budget ran out; `found` then holds a subset and the text must be rescanned.
    template <typename CharT>
    bool scan(const CharT* s, size_t n, uint64_t* found) const;

    // Whether scan may use the AVX2 path (the CPU has it and set_simd has not turned it off).
    static bool simd_available();
    // Tests compare the AVX2 and the portable scans; returns the previous setting.
    static bool set_simd(bool enabled);

private:
    // Advances i in steps of 8 to the first eight positions of which some pass the three SIMD tables and
    // returns those (bit k: position i + k), or returns 0 with i at the first step where i + 16 > n.
    uint32_t next_marked_avx2(const uint8_t* s, size_t& i, size_t n) const;
    static constexpr size_t kMaxSimdPatterns = 48;  // beyond this the 256-bit tables fill up

    struct Pattern {
        uint32_t begin, length, group;
        bool latin1;  // every character < 256
    };
    struct Entry {
        uint32_t hash;     // hash(key): a bijection of the key, so equal hashes mean equal (folded) keys
        uint32_t pattern;  // index into patterns_
    };

    // One character folded to 8 bits; Latin-1 characters (all a kind-1 str holds) map to themselves.
    static uint32_t fold(uint8_t c) { return c; }
    static uint32_t fold(char32_t c) { return (c ^ (c >> 8) ^ (c >> 16)) & 0xFFu; }

    template <typename CharT>
    static uint32_t pack4(const CharT* s) {
        if constexpr (sizeof(CharT) == 1 && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) {
            uint32_t k;
            std::memcpy(&k, s, 4);
            return k;
        } else {
            return fold(s[0]) | fold(s[1]) << 8 | fold(s[2]) << 16 | fold(s[3]) << 24;
        }
    }
    // Multiplying by an odd constant permutes 32-bit words; the filter's two bits are cut from the product.
    static uint32_t hash(uint32_t key) { return key * kMultiplier; }
    static uint32_t bit1(uint32_t h) { return h >> (32 - kBits); }
    static uint32_t bit2(uint32_t h) { return (h >> 8) & ((1u << kBits) - 1); }
    bool test(uint32_t b) const { return (table_[b >> 6] >> (b & 63)) & 1; }
    bool marked(uint32_t h) const { return test(bit1(h)) && test(bit2(h)); }

    // Verifies the patterns keyed (q, h) at s[i, ...). Returns false when the budget ran out.
    template <typename CharT>
    bool verify(const CharT* s, size_t n, size_t i, size_t q, uint32_t h, uint64_t* found, uint32_t& remaining,
                int64_t& budget) const;  // q: always q_ (passed to keep it in a register)

    static constexpr uint32_t kMultiplier = 0x9E3779B1u;

    bool usable_ = false;
    bool simd_useful_ = false;
    uint32_t simd_table_[3][8] = {};  // three 256-bit Bloom tables on bits 24.., 16.., 8.. of the hash
    uint64_t table_[(1u << kBits) / 64] = {};
    uint32_t n_groups_with_patterns_ = 0;
    size_t q_ = kMaxQ;                  // key length
    uint32_t key_mask_ = 0xFFFFFFFFu;   // the low q_ bytes of a packed key
    std::vector<Entry> entries_;        // sorted by hash
    std::vector<Pattern> patterns_;  // distinct (pattern, group) pairs
    std::vector<char32_t> chars_;    // their characters back to back
    std::vector<uint8_t> bytes_;     // the same as bytes (meaningful for Latin-1 patterns only)
};

template <typename CharT>
bool QGramFilter::verify(const CharT* s, size_t n, size_t i, size_t q, uint32_t h, uint64_t* found,
                         uint32_t& remaining, int64_t& budget) const {
    const std::vector<Entry>& bucket = entries_;
    size_t e = 0;
    for (size_t step = bucket.size(); step > 0;) {  // first entry with hash >= h
        const size_t half = step / 2;
        if (bucket[e + half].hash < h) {
            e += half + 1;
            step -= half + 1;
        } else {
            step = half;
        }
    }
    for (; e < bucket.size() && bucket[e].hash == h; ++e) {
        const Pattern& pattern = patterns_[bucket[e].pattern];
        const uint32_t g = pattern.group;
        if ((found[g >> 6] >> (g & 63)) & 1) continue;
        const size_t len = pattern.length;
        if (len > n - i) continue;
        size_t j = 0;
        if constexpr (sizeof(CharT) == 1) {
            // Latin-1 text: the key's hash is a bijection of its bytes, so the first q characters already
            // match; compare the rest eight at a time. A pattern outside Latin-1 cannot occur at all.
            if (!pattern.latin1) continue;
            const uint8_t* pat = bytes_.data() + pattern.begin;
            j = q;
            for (uint64_t a, b; j + 8 <= len; j += 8) {
                std::memcpy(&a, s + i + j, 8);
                std::memcpy(&b, pat + j, 8);
                if (a != b) break;
            }
            while (j < len && s[i + j] == pat[j]) ++j;
        } else {
            const char32_t* pat = chars_.data() + pattern.begin;
            while (j < len && s[i + j] == pat[j]) ++j;
        }
        budget -= static_cast<int64_t>(j) + 1;
        if (j == len) {
            found[g >> 6] |= uint64_t{1} << (g & 63);
            --remaining;
        }
    }
    return budget >= 0;
}

template <typename CharT>
bool QGramFilter::scan(const CharT* s, size_t n, uint64_t* found) const {
    if (n_groups_with_patterns_ == 0) return true;
    uint32_t remaining = n_groups_with_patterns_;
    int64_t budget = 4 * static_cast<int64_t>(n) + 1024;
    if (n < q_) return true;
    const size_t last = n - q_;  // last position where a key fits
    size_t i = 0;
    const size_t q = q_;
    const uint32_t mask = key_mask_;
    auto check = [&](size_t at, uint32_t key) {
        const uint32_t h = hash(key & mask);
        return marked(h) && (!verify(s, n, at, q, h, found, remaining, budget) || remaining == 0);
    };
    if constexpr (sizeof(CharT) == 1) {
        if (simd_useful_ && simd_available()) {
            // Eight positions per step with AVX2 against three small Bloom tables; the few positions that
            // pass all three go through the full check.
            while (const uint32_t lanes = next_marked_avx2(s, i, n)) {
                for (uint32_t m = lanes; m; m &= m - 1)
                    if (check(i + __builtin_ctz(m), pack4(s + i + __builtin_ctz(m)))) return budget >= 0;
                i += 8;
            }
        }
    }
    if (n >= kMaxQ) {
        // Four positions per round; the rare round with a marked position is redone one by one.
        const size_t full = n - kMaxQ;  // four characters can be read at positions [0, full]
        for (; i + 3 <= full; i += 4) {
            const uint32_t h0 = hash(pack4(s + i) & mask), h1 = hash(pack4(s + i + 1) & mask);
            const uint32_t h2 = hash(pack4(s + i + 2) & mask), h3 = hash(pack4(s + i + 3) & mask);
            if (test(bit1(h0)) | test(bit1(h1)) | test(bit1(h2)) | test(bit1(h3))) {
                for (size_t k = 0; k < 4; ++k)
                    if (check(i + k, pack4(s + i + k))) return budget >= 0;
            }
        }
        for (; i <= full; ++i)
            if (check(i, pack4(s + i))) return budget >= 0;
    }
    for (; i <= last; ++i) {  // the last few positions, where four characters cannot be read
        uint32_t key = 0;
        for (size_t j = 0; j < q; ++j) key |= fold(s[i + j]) << (8 * j);
        if (check(i, key)) return budget >= 0;
    }
    return true;
}

}  // namespace r1vl::keystep
