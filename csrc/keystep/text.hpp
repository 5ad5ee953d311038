// Text preparation for key-step matching: the released code's step extraction and the paper preset's
// soft normalisation (docs/REWARDS.md gives the rules; r1vl_fast/rewards/reference.py is the slow twin).
#pragma once

#include <vector>

#include "unicode.hpp"

namespace r1vl::keystep {

struct Segment {
    size_t begin, end;
};

// The spans of re.findall(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", text, re.DOTALL), in order.
void step_segments(const TextView& text, std::vector<Segment>& out);

// Appends re.findall(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", text, re.DOTALL) joined by " " to out.
void extract_steps_append(const TextView& text, u32string& out);

// Appends text[begin, end) (or the whole text) to out.
void copy_append(const TextView& text, size_t begin, size_t end, u32string& out);
void copy_append(const TextView& text, u32string& out);

// out = str.lower(s).
void lower(const u32string& s, u32string& out);

// out = normalize(s) (lower-case, LaTeX and Unicode operators unified, numbers canonical, spacing
// around operators dropped, \frac{a}{b} -> a/b). `tmp` is scratch space.
void normalize(const u32string& s, u32string& out, u32string& tmp);

// Characters around which normalisation drops whitespace; a fraction argument holding one is parenthesised.
bool is_operator(char32_t c);

}  // namespace r1vl::keystep
