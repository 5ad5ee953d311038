#include "unicode.hpp"

namespace r1vl::keystep::unicode {
namespace {
#include "unicode_tables.inc"

constexpr char32_t kCapitalSigma = 0x3A3, kSmallSigma = 0x3C3, kFinalSigma = 0x3C2;
constexpr char32_t kCapitalIDot = 0x130, kCombiningDot = 0x307;

bool case_ignorable(char32_t c) { return properties(c) & kCaseIgnorable; }
bool cased(char32_t c) { return properties(c) & kCased; }

// CPython's Final_Sigma rule: cased (case-ignorable)* Σ !((case-ignorable)* cased).
bool final_sigma(const char32_t* s, size_t n, size_t i) {
    size_t j = i;
    while (j > 0 && case_ignorable(s[j - 1])) --j;
    if (j == 0 || !cased(s[j - 1])) return false;
    size_t k = i + 1;
    while (k < n && case_ignorable(s[k])) ++k;
    return k == n || !cased(s[k]);
}
}  // namespace

uint8_t properties(char32_t c) {
    if (c >= 0x110000) return 0;
    return kPropStage2[kPropStage1[c / R1VL_UNICODE_BLOCK] * R1VL_UNICODE_BLOCK + c % R1VL_UNICODE_BLOCK];
}

char32_t simple_lower(char32_t c) {
    if (c >= 0x110000) return c;
    return c + kLowerStage2[kLowerStage1[c / R1VL_UNICODE_BLOCK] * R1VL_UNICODE_BLOCK + c % R1VL_UNICODE_BLOCK];
}

void lower_append(const char32_t* s, size_t n, u32string& out) {
    // ASCII prefix through a raw pointer (the usual case is all of it), the rest character by character.
    const size_t at = out.size();
    out.resize(at + n);
    char32_t* dst = out.data() + at;
    size_t i = 0;
    for (; i < n && s[i] < 128; ++i) dst[i] = s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i];
    out.resize(at + i);
    for (; i < n; ++i) {
        const char32_t c = s[i];
        if (c < 128) {
            out.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
        } else if (c == kCapitalSigma) {
            out.push_back(final_sigma(s, n, i) ? kFinalSigma : kSmallSigma);
        } else if (c == kCapitalIDot) {
            out.push_back(U'i');
            out.push_back(kCombiningDot);
        } else {
            out.push_back(simple_lower(c));
        }
    }
}

}  // namespace r1vl::keystep::unicode
