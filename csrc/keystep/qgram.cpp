#include "qgram.hpp"

#include <algorithm>
#include <atomic>
#include <string_view>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define R1VL_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace r1vl::keystep {

bool QGramFilter::build(const Patterns& patterns) {
    const size_t n = patterns.size();
    if (n > kMaxPatterns) return false;
    size_t shortest = kMaxQ;
    for (size_t k = 0; k < n; ++k) shortest = std::min(shortest, patterns.length(k));
    if (shortest < 2) return false;  // one-character keys would mark too much of any text
    q_ = shortest;
    key_mask_ = q_ == 4 ? 0xFFFFFFFFu : (1u << (8 * q_)) - 1;
    // Filled through raw pointers, then trimmed: push_back's bookkeeping costs more than the work here.
    patterns_.resize(n);
    entries_.resize(n);
    chars_.resize(patterns.chars.size());
    bytes_.resize(patterns.chars.size());
    Pattern* out = patterns_.data();
    Entry* entry = entries_.data();
    char32_t* chars = chars_.data();
    uint8_t* bytes = bytes_.data();
    uint32_t used = 0, kept = 0;
    auto text = [&](size_t k) { return std::u32string_view(patterns.data(k), patterns.length(k)); };
    size_t run = 0;  // first pattern of the current run of one group
    for (size_t k = 0; k < n; ++k) {
        const uint32_t group = patterns.group[k];
        if (k == 0 || group != patterns.group[k - 1]) {
            run = k;
            ++n_groups_with_patterns_;  // counts a group twice if its patterns are not adjacent: safe, see scan
        }
        // Alternatives of a group often coincide once lowered or normalised: keep one of each.
        bool repeated = false;
        for (size_t r = run; r < k && !repeated; ++r) repeated = text(r) == text(k);
        if (repeated) continue;
        const char32_t* c = patterns.data(k);
        const uint32_t len = static_cast<uint32_t>(patterns.length(k));
        bool latin1 = true;
        for (uint32_t j = 0; j < len; ++j) {
            chars[used + j] = c[j];
            bytes[used + j] = static_cast<uint8_t>(c[j]);
            latin1 &= c[j] < 256;
        }
        out[kept] = Pattern{used, len, group, latin1};
        used += len;
        uint32_t key = 0;
        for (size_t j = 0; j < q_; ++j) key |= fold(c[j]) << (8 * j);
        const uint32_t h = hash(key);
        for (const uint32_t b : {bit1(h), bit2(h)}) table_[b >> 6] |= uint64_t{1} << (b & 63);
        for (unsigned t = 0; t < 3; ++t) {
            const uint32_t b = (h >> (24 - 8 * t)) & 255;
            simd_table_[t][b >> 5] |= 1u << (b & 31);
        }
        entry[kept] = Entry{h, kept};
        ++kept;
    }
    patterns_.resize(kept);
    entries_.resize(kept);
    chars_.resize(used);
    bytes_.resize(used);
    std::sort(entries_.begin(), entries_.end(),
              [](const Entry& a, const Entry& b) { return a.hash != b.hash ? a.hash < b.hash : a.pattern < b.pattern; });
    simd_useful_ = patterns_.size() <= kMaxSimdPatterns;
    usable_ = true;
    return true;
}

namespace {
std::atomic<bool> simd_enabled{true};
}

bool QGramFilter::set_simd(bool enabled) { return simd_enabled.exchange(enabled); }

#ifdef R1VL_HAVE_AVX2_PATH

bool QGramFilter::simd_available() {
    static const bool cpu = __builtin_cpu_supports("avx2");
    return cpu && simd_enabled.load(std::memory_order_relaxed);
}

__attribute__((target("avx2"))) uint32_t QGramFilter::next_marked_avx2(const uint8_t* s, size_t& i, size_t n) const {
    // Lane k of a step holds the four bytes at i + k, spread out of one 16-byte load.
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4, 5, 3, 4, 5, 6,  //
                                            4, 5, 6, 7, 5, 6, 7, 8, 6, 7, 8, 9, 7, 8, 9, 10);
    const __m256i mask = _mm256_set1_epi32(static_cast<int>(key_mask_));
    const __m256i multiplier = _mm256_set1_epi32(static_cast<int>(kMultiplier));
    const __m256i low5 = _mm256_set1_epi32(31), one = _mm256_set1_epi32(1);
    // Three 256-bit Bloom tables live in registers; vpermd picks each lane's 32-bit word (it reads only
    // the low three bits of the index), so no gather is needed.
    const __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(simd_table_[0]));
    const __m256i t1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(simd_table_[1]));
    const __m256i t2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(simd_table_[2]));
    for (; i + 16 <= n; i += 8) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        const __m256i keys = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), spread), mask);
        const __m256i h = _mm256_mullo_epi32(keys, multiplier);
        // table k holds bit (h >> (24 - 8k)) & 255: word (h >> (29 - 8k)) & 7, bit (h >> (24 - 8k)) & 31
        const __m256i b0 = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(t0, _mm256_srli_epi32(h, 29)),
                                             _mm256_and_si256(_mm256_srli_epi32(h, 24), low5));
        const __m256i b1 = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(t1, _mm256_srli_epi32(h, 21)),
                                             _mm256_and_si256(_mm256_srli_epi32(h, 16), low5));
        const __m256i b2 = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(t2, _mm256_srli_epi32(h, 13)),
                                             _mm256_and_si256(_mm256_srli_epi32(h, 8), low5));
        const __m256i hit = _mm256_and_si256(_mm256_and_si256(b0, b1), _mm256_and_si256(b2, one));
        const uint32_t lanes = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(hit, 31))));
        if (lanes) return lanes;
    }
    return 0;
}

#else

bool QGramFilter::simd_available() { return false; }
uint32_t QGramFilter::next_marked_avx2(const uint8_t*, size_t&, size_t) const { return 0; }

#endif

}  // namespace r1vl::keystep
