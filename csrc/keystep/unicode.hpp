// Unicode properties exactly as CPython sees them: str.lower() (full mapping + Final_Sigma), \s, \d.
// The tables are generated at build time from the interpreter the extension is built for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace r1vl::keystep {

using u32string = std::u32string;

namespace unicode {

enum Property : uint8_t { kCaseIgnorable = 1, kCased = 2, kSpace = 4, kDecimal = 8 };

uint8_t properties(char32_t c);
char32_t simple_lower(char32_t c);

inline bool is_space(char32_t c) {
    if (c < 128) return c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
    return properties(c) & kSpace;
}
inline bool is_decimal(char32_t c) {
    if (c < 128) return c >= '0' && c <= '9';
    return properties(c) & kDecimal;
}

// Appends str.lower() of s[0, n) to out. The Final_Sigma context is read from s itself, as CPython does.
void lower_append(const char32_t* s, size_t n, u32string& out);

}  // namespace unicode

// A CPython str seen in its own storage (1, 2 or 4 bytes per code point): no copy, no encoding.
struct TextView {
    const void* data = nullptr;
    size_t length = 0;
    int kind = 4;

    char32_t operator[](size_t i) const {
        switch (kind) {
            case 1: return static_cast<const uint8_t*>(data)[i];
            case 2: return static_cast<const uint16_t*>(data)[i];
            default: return static_cast<const char32_t*>(data)[i];
        }
    }
};

}  // namespace r1vl::keystep
