#include "text.hpp"

#include <cstring>
#include <string_view>
#include <vector>

namespace r1vl::keystep {
namespace {

// Index of the first `ch` in s[from, n), or n (memchr on 1-byte strings).
template <typename CharT>
size_t find_char(const CharT* s, size_t from, size_t n, char ch) {
    if constexpr (sizeof(CharT) == 1) {
        const void* p = std::memchr(s + from, ch, n - from);
        return p ? static_cast<size_t>(static_cast<const CharT*>(p) - s) : n;
    } else {
        while (from < n && s[from] != static_cast<CharT>(ch)) ++from;
        return from;
    }
}

template <typename CharT>
void step_segments_typed(const CharT* s, size_t n, std::vector<Segment>& out) {
    // The regex engine tries every start; "\d+:" cannot backtrack into a match (':' is no digit), "\s*" is
    // greedy and never needs to give back (the lazy group can always run to \Z), and findall resumes at the
    // end of the group because the lookahead consumes nothing.
    static constexpr char kHeader[] = "### Step ";
    constexpr size_t kHeaderLen = sizeof(kHeader) - 1;
    size_t pos = 0;
    while (pos + kHeaderLen <= n) {
        size_t i = find_char(s, pos, n, '#');
        for (; i + kHeaderLen <= n; i = find_char(s, i + 1, n, '#')) {
            size_t k = 1;
            while (k < kHeaderLen && static_cast<char32_t>(s[i + k]) == static_cast<char32_t>(kHeader[k])) ++k;
            if (k == kHeaderLen) break;
        }
        if (i + kHeaderLen > n) return;
        size_t d = i + kHeaderLen;
        while (d < n && unicode::is_decimal(s[d])) ++d;
        if (d == i + kHeaderLen || d >= n || s[d] != ':') {
            pos = i + 1;
            continue;
        }
        size_t begin = d + 1;
        while (begin < n && unicode::is_space(s[begin])) ++begin;
        size_t end = begin;
        for (;;) {
            end = find_char(s, end, n, '\n');
            if (end == n || (end + 3 < n && s[end + 1] == '#' && s[end + 2] == '#' && s[end + 3] == '#')) break;
            ++end;
        }
        out.push_back({begin, end});
        pos = end;
    }
}

template <typename F>
void dispatch(const TextView& t, F&& f) {
    switch (t.kind) {
        case 1: f(static_cast<const uint8_t*>(t.data)); break;
        case 2: f(static_cast<const uint16_t*>(t.data)); break;
        default: f(static_cast<const char32_t*>(t.data)); break;
    }
}

bool is_ascii_letter(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }

bool equals(const u32string& s, size_t begin, size_t end, std::string_view word) {
    if (end - begin != word.size()) return false;
    for (size_t k = 0; k < word.size(); ++k)
        if (s[begin + k] != static_cast<char32_t>(word[k])) return false;
    return true;
}

char32_t unify_operator(char32_t c) {
    switch (c) {
        case 0x2212: case 0x2010: case 0x2011: case 0x2012: case 0x2013: case 0x2014: case 0x2015:
        case 0xFE63: case 0xFF0D:
            return U'-';
        case 0x00D7: case 0x00B7: case 0x22C5: case 0x2217:
            return U'*';
        case 0x00F7: case 0x2215: case 0x2044:
            return U'/';
        case 0xFF1D: return U'=';
        case 0xFF0B: return U'+';
        default: return c;
    }
}

void append_ascii(u32string& out, std::string_view word) {
    for (char ch : word) out.push_back(static_cast<char32_t>(ch));
}

// Pass 2: `$`, \left, \right, spacing commands dropped; operators and \frac variants unified.
void rewrite_tokens(const u32string& s, u32string& out) {
    out.clear();
    const size_t n = s.size();
    for (size_t i = 0; i < n;) {
        const char32_t c = s[i];
        if (c == U'$') { ++i; continue; }
        if (c == U'\\' && i + 1 < n) {
            const char32_t next = s[i + 1];
            if (is_ascii_letter(next)) {
                size_t j = i + 1;
                while (j < n && is_ascii_letter(s[j])) ++j;
                if (equals(s, i + 1, j, "left") || equals(s, i + 1, j, "right")) {
                } else if (equals(s, i + 1, j, "times") || equals(s, i + 1, j, "cdot") || equals(s, i + 1, j, "ast")) {
                    out.push_back(U'*');
                } else if (equals(s, i + 1, j, "div")) {
                    out.push_back(U'/');
                } else if (equals(s, i + 1, j, "frac") || equals(s, i + 1, j, "dfrac") || equals(s, i + 1, j, "tfrac")) {
                    append_ascii(out, "frac");
                } else if (equals(s, i + 1, j, "circ") || equals(s, i + 1, j, "degree")) {
                    out.push_back(0xB0);
                } else {
                    out.append(s, i, j - i);
                }
                i = j;
                continue;
            }
            if (next == U',' || next == U'!' || next == U';' || next == U':' || next == U' ') { i += 2; continue; }
            if (next == U'%') { out.push_back(U'%'); i += 2; continue; }
        }
        out.push_back(unify_operator(c));
        ++i;
    }
}

size_t digit_run_end(const u32string& s, size_t i) {
    while (i < s.size() && is_digit(s[i])) ++i;
    return i;
}

// Appends the fraction digits s[begin, end) without trailing zeros, with a leading '.' if any remain.
void append_fraction(const u32string& s, size_t begin, size_t end, u32string& out) {
    while (end > begin && s[end - 1] == U'0') --end;
    if (end == begin) return;
    out.push_back(U'.');
    out.append(s, begin, end - begin);
}

// Pass 3: canonical numbers: thousands separators dropped, trailing fraction zeros dropped, ".5" -> "0.5".
void canonical_numbers(const u32string& s, u32string& out) {
    out.clear();
    const size_t n = s.size();
    for (size_t i = 0; i < n;) {
        const char32_t c = s[i];
        if (is_digit(c)) {
            size_t j = digit_run_end(s, i);
            out.append(s, i, j - i);
            if (j - i <= 3) {
                while (j + 4 <= n && s[j] == U',' && is_digit(s[j + 1]) && is_digit(s[j + 2]) && is_digit(s[j + 3]) &&
                       (j + 4 == n || !is_digit(s[j + 4]))) {
                    out.append(s, j + 1, 3);
                    j += 4;
                }
            }
            if (j + 1 < n && s[j] == U'.' && is_digit(s[j + 1])) {
                const size_t f = digit_run_end(s, j + 1);
                append_fraction(s, j + 1, f, out);
                j = f;
            }
            i = j;
        } else if (c == U'.' && i + 1 < n && is_digit(s[i + 1]) && (i == 0 || !is_digit(s[i - 1]))) {
            const size_t f = digit_run_end(s, i + 1);
            out.push_back(U'0');
            append_fraction(s, i + 1, f, out);
            i = f;
        } else {
            out.push_back(c);
            ++i;
        }
    }
}

// Pass 5: whitespace runs collapse to one space, dropped next to operators and at both ends.
void collapse_spaces(const u32string& s, u32string& out) {
    out.clear();
    bool pending = false;
    for (char32_t c : s) {
        if (unicode::is_space(c)) { pending = true; continue; }
        if (pending && !out.empty() && !is_operator(out.back()) && !is_operator(c)) out.push_back(U' ');
        pending = false;
        out.push_back(c);
    }
}

// Pass 6: "^°" and "^{°}" -> "°" (so 30^\circ, 30^{\circ} and 30° agree).
void fold_degrees(const u32string& s, u32string& out) {
    out.clear();
    const size_t n = s.size();
    for (size_t i = 0; i < n;) {
        if (s[i] == U'^' && i + 1 < n && s[i + 1] == 0xB0) { out.push_back(0xB0); i += 2; continue; }
        if (s[i] == U'^' && i + 3 < n && s[i + 1] == U'{' && s[i + 2] == 0xB0 && s[i + 3] == U'}') {
            out.push_back(0xB0);
            i += 4;
            continue;
        }
        out.push_back(s[i]);
        ++i;
    }
}

constexpr int kMaxFracDepth = 32;

bool is_atom(const u32string& x) {
    if (x.empty()) return false;
    for (char32_t c : x)
        if (is_operator(c) || unicode::is_space(c)) return false;
    return true;
}

// Appends the argument without surrounding whitespace, parenthesised unless it is an atom.
void append_wrapped(const u32string& x, u32string& out) {
    size_t b = 0, e = x.size();
    while (b < e && unicode::is_space(x[b])) ++b;
    while (e > b && unicode::is_space(x[e - 1])) --e;
    const u32string trimmed = x.substr(b, e - b);
    if (is_atom(trimmed)) { out += trimmed; return; }
    out.push_back(U'(');
    out += trimmed;
    out.push_back(U')');
}

// Pass 4: frac{a}{b} -> a/b, each argument parenthesised unless it is an atom; nested fractions first.
// close[j] is the index of the brace closing the '{' at j (or npos), computed once for the whole string.
void rewrite_fractions(const u32string& s, size_t lo, size_t hi, const std::vector<size_t>& close, int depth,
                       u32string& out) {
    static constexpr char kFrac[] = "frac{";
    for (size_t i = lo; i < hi;) {
        if (depth < kMaxFracDepth && i + 5 <= hi && equals(s, i, i + 5, kFrac) &&
            (i == lo || !(s[i - 1] >= 'a' && s[i - 1] <= 'z'))) {
            const size_t a_close = close[i + 4];
            if (a_close != u32string::npos && a_close + 1 < hi && s[a_close + 1] == U'{') {
                const size_t b_close = close[a_close + 1];
                if (b_close != u32string::npos && b_close < hi) {
                    u32string a, b;
                    rewrite_fractions(s, i + 5, a_close, close, depth + 1, a);
                    rewrite_fractions(s, a_close + 2, b_close, close, depth + 1, b);
                    append_wrapped(a, out);
                    out.push_back(U'/');
                    append_wrapped(b, out);
                    i = b_close + 1;
                    continue;
                }
            }
        }
        out.push_back(s[i]);
        ++i;
    }
}

void rewrite_fractions(const u32string& s, u32string& out) {
    out.clear();
    std::vector<size_t> close(s.size(), u32string::npos);
    std::vector<size_t> open;
    bool any = false;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == U'{') {
            open.push_back(i);
        } else if (s[i] == U'}' && !open.empty()) {
            close[open.back()] = i;
            open.pop_back();
            any = true;
        }
    }
    if (!any) { out = s; return; }
    rewrite_fractions(s, 0, s.size(), close, 0, out);
}

}  // namespace

bool is_operator(char32_t c) {
    switch (c) {
        case U'+': case U'-': case U'*': case U'/': case U'=': case U'^': case U'<': case U'>':
        case U'(': case U')': case U'[': case U']': case U'{': case U'}': case U',': case U';':
        case U':': case U'|':
            return true;
        default:
            return false;
    }
}

void step_segments(const TextView& text, std::vector<Segment>& out) {
    out.clear();
    dispatch(text, [&](auto* s) { step_segments_typed(s, text.length, out); });
}

void copy_append(const TextView& text, size_t begin, size_t end, u32string& out) {
    const size_t at = out.size();
    out.resize(at + (end - begin));
    char32_t* dst = out.data() + at;
    dispatch(text, [&](auto* s) { std::copy(s + begin, s + end, dst); });
}

void copy_append(const TextView& text, u32string& out) { copy_append(text, 0, text.length, out); }

void extract_steps_append(const TextView& text, u32string& out) {
    std::vector<Segment> segments;
    step_segments(text, segments);
    for (size_t k = 0; k < segments.size(); ++k) {
        if (k) out.push_back(U' ');
        copy_append(text, segments[k].begin, segments[k].end, out);
    }
}

void lower(const u32string& s, u32string& out) {
    out.clear();
    unicode::lower_append(s.data(), s.size(), out);
}

void normalize(const u32string& s, u32string& out, u32string& tmp) {
    lower(s, out);
    rewrite_tokens(out, tmp);
    canonical_numbers(tmp, out);
    rewrite_fractions(out, tmp);
    collapse_spaces(tmp, out);
    fold_degrees(out, tmp);
    out.swap(tmp);
}

}  // namespace r1vl::keystep
