#include "matcher.hpp"

#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "text.hpp"

namespace r1vl::keystep {

KeySteps compile(const GroupList& groups, Mode mode, size_t min_alt_len) {
    thread_local u32string alt, prepared, tmp;
    KeySteps ks;
    ks.n_groups = groups.n_groups();
    ks.always.assign(ks.n_groups, 0);
    ks.matchable.assign(ks.n_groups, 0);
    u32string& chars = ks.patterns.chars;  // alternatives are prepared straight into the pattern buffer
    chars.reserve(groups.chars.size());
    ks.patterns.end.reserve(groups.alt_end.size());
    ks.patterns.group.reserve(groups.alt_end.size());
    uint32_t k = 0;
    for (uint32_t g = 0; g < ks.n_groups; ++g) {
        for (; k < groups.group_end[g]; ++k) {
            const size_t begin = k ? groups.alt_end[k - 1] : 0, at = chars.size();
            if (mode == Mode::kR1VL) {
                unicode::lower_append(groups.chars.data() + begin, groups.alt_end[k] - begin, chars);
            } else {
                alt.assign(groups.chars, begin, groups.alt_end[k] - begin);
                normalize(alt, prepared, tmp);
                chars += prepared;
            }
            const size_t length = chars.size() - at;
            if (length < min_alt_len || length == 0) {
                chars.resize(at);
                // `"" in text` is always true in the released code; the paper presets reject empty alternatives.
                if (length == 0 && min_alt_len == 0 && mode == Mode::kR1VL) ks.always[g] = ks.matchable[g] = 1;
                continue;
            }
            ks.matchable[g] = 1;
            ks.patterns.end.push_back(static_cast<uint32_t>(chars.size()));
            ks.patterns.group.push_back(g);
            if (mode == Mode::kFuzzy) ks.fuzzy.emplace_back(Needle(u32string(chars, at, length)), g);
        }
        ks.n_matchable += ks.matchable[g];
    }
    ks.filter.build(ks.patterns);
    return ks;
}

const AhoCorasick& KeySteps::automaton() const {
    if (AhoCorasick* built = automaton_.load(std::memory_order_acquire)) return *built;
    static std::mutex building;  // rare: only samples that need the automaton get here
    std::lock_guard<std::mutex> lock(building);
    if (AhoCorasick* built = automaton_.load(std::memory_order_relaxed)) return *built;
    std::vector<std::pair<u32string, uint32_t>> list;
    list.reserve(patterns.size());
    for (size_t k = 0; k < patterns.size(); ++k)
        list.emplace_back(u32string(patterns.data(k), patterns.length(k)), patterns.group[k]);
    auto automaton = std::make_unique<AhoCorasick>();
    automaton->build(list, n_groups);
    automaton_.store(automaton.get(), std::memory_order_release);
    return *automaton.release();
}

KeySteps::KeySteps(KeySteps&& other) noexcept { *this = std::move(other); }

KeySteps& KeySteps::operator=(KeySteps&& other) noexcept {
    if (this == &other) return *this;
    n_groups = other.n_groups;
    always = std::move(other.always);
    matchable = std::move(other.matchable);
    n_matchable = other.n_matchable;
    patterns = std::move(other.patterns);
    filter = std::move(other.filter);
    fuzzy = std::move(other.fuzzy);
    delete automaton_.exchange(other.automaton_.exchange(nullptr));
    return *this;
}

KeySteps::~KeySteps() { delete automaton_.load(); }

void prepare_text(const TextView& text, Mode mode, Scope scope, u32string& out, u32string& tmp1, u32string& tmp2) {
    tmp1.clear();
    if (scope == Scope::kSteps) {
        extract_steps_append(text, tmp1);
    } else {
        copy_append(text, tmp1);
    }
    if (mode == Mode::kR1VL) {
        lower(tmp1, out);
    } else {
        normalize(tmp1, out, tmp2);
    }
}

namespace {

struct Scratch {
    u32string text, tmp1, tmp2;
    std::vector<uint8_t> bytes;
    std::vector<uint8_t> flags;
    std::vector<uint64_t> found;
    std::vector<Segment> segments;
    std::vector<uint16_t> classes;
};

// str.lower() of a Latin-1 character: Latin-1 lower-cases within Latin-1, one character to one.
struct Latin1Lower {
    uint8_t table[256];
    Latin1Lower() {
        for (uint32_t c = 0; c < 256; ++c) table[c] = static_cast<uint8_t>(unicode::simple_lower(c));
    }
};

// The text as matched in r1vl mode when it is Latin-1: scope applied and lower-cased, one byte a character.
void lowered_latin1(const TextView& view, Scope scope, Scratch& scratch) {
    static const Latin1Lower lower;
    const auto* s = static_cast<const uint8_t*>(view.data);
    std::vector<uint8_t>& out = scratch.bytes;
    out.clear();
    auto append = [&](size_t begin, size_t end) {
        const size_t at = out.size();
        out.resize(at + (end - begin));
        uint8_t* dst = out.data() + at;
        size_t i = begin;
        // Eight ASCII bytes at a time: set 0x20 in every byte within 'A'..'Z' (SWAR); anything else by table.
        constexpr uint64_t kOnes = 0x0101010101010101ull, kHigh = 0x8080808080808080ull;
        for (; i + 8 <= end; i += 8, dst += 8) {
            uint64_t x;
            std::memcpy(&x, s + i, 8);
            if (x & kHigh) {
                for (size_t k = 0; k < 8; ++k) dst[k] = lower.table[s[i + k]];
                continue;
            }
            const uint64_t at_least_a = x + kOnes * (0x80 - 'A');   // high bit set where byte >= 'A'
            const uint64_t above_z = x + kOnes * (0x80 - 'Z' - 1);  // high bit set where byte > 'Z'
            x |= ((at_least_a & ~above_z) & kHigh) >> 2;
            std::memcpy(dst, &x, 8);
        }
        for (; i < end; ++i) *dst++ = lower.table[s[i]];
    };
    if (scope == Scope::kAll) {
        append(0, view.length);
        return;
    }
    step_segments(view, scratch.segments);
    for (size_t k = 0; k < scratch.segments.size(); ++k) {
        if (k) out.push_back(' ');
        append(scratch.segments[k].begin, scratch.segments[k].end);
    }
}

// ORs into `found` the groups with an alternative occurring in the prepared text s[0, n).
template <typename CharT>
void exact_search(const CharT* s, size_t n, const KeySteps& ks, Scratch& scratch, uint64_t* found) {
    if (ks.filter.usable() && ks.filter.scan(s, n, found)) return;
    const AhoCorasick& ac = ks.automaton();
    if (ac.lane_scannable()) {
        std::vector<uint16_t>& cls = scratch.classes;
        cls.clear();
        ac.classes_of(s, n, cls);
        ac.scan_classes(cls.data(), cls.size(), found);
    } else {
        AhoCorasick::Cursor cursor{0, found};
        ac.feed(s, n, cursor);
    }
}

int32_t match_one(const TextView& view, const KeySteps& ks, const Options& o, Scratch& scratch, uint8_t* out_flags) {
    std::vector<uint8_t>& flags = scratch.flags;
    flags.assign(ks.always.begin(), ks.always.end());
    uint32_t found = 0;
    for (uint8_t f : flags) found += f;
    if (found < ks.n_matchable) {
        scratch.found.assign(std::max<size_t>(1, (ks.n_groups + 63) / 64), 0);
        if (o.mode == Mode::kR1VL && view.kind == 1) {
            lowered_latin1(view, o.scope, scratch);
            exact_search(scratch.bytes.data(), scratch.bytes.size(), ks, scratch, scratch.found.data());
        } else {
            prepare_text(view, o.mode, o.scope, scratch.text, scratch.tmp1, scratch.tmp2);
            exact_search(scratch.text.data(), scratch.text.size(), ks, scratch, scratch.found.data());
        }
        for (uint32_t g = 0; g < ks.n_groups; ++g) {
            if (!flags[g] && ((scratch.found[g / 64] >> (g % 64)) & 1)) {
                flags[g] = 1;
                ++found;
            }
        }
        if (o.mode == Mode::kFuzzy) {
            for (const auto& [needle, g] : ks.fuzzy) {
                if (found == ks.n_matchable) break;
                if (flags[g]) continue;
                if (partial_ratio_reaches(needle, scratch.text, o.fuzzy_threshold)) {
                    flags[g] = 1;
                    ++found;
                }
            }
        }
    }
    if (out_flags) std::copy(flags.begin(), flags.end(), out_flags);
    return static_cast<int32_t>(found);
}

}  // namespace

void parallel_for(size_t n, int threads, size_t min_per_thread, const std::function<void(size_t)>& f) {
    size_t workers = threads > 0 ? static_cast<size_t>(threads) : std::max(1u, std::thread::hardware_concurrency());
    workers = std::max<size_t>(1, std::min(workers, (n + min_per_thread - 1) / std::max<size_t>(1, min_per_thread)));
    if (workers <= 1) {
        for (size_t i = 0; i < n; ++i) f(i);
        return;
    }
    std::atomic<size_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    constexpr size_t kChunk = 4;
    auto work = [&] {
        try {
            for (;;) {
                const size_t begin = next.fetch_add(kChunk);
                if (begin >= n) return;
                for (size_t i = begin; i < std::min(n, begin + kChunk); ++i) f(i);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            next.store(n);
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(workers - 1);
    for (size_t t = 1; t < workers; ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    if (error) std::rethrow_exception(error);
}

void match_batch(const std::vector<TextView>& texts, const std::vector<const KeySteps*>& key_steps,
                 const Options& options, int32_t* matched, uint8_t* group_flags) {
    const size_t n = texts.size();
    std::vector<size_t> flag_offset(n + 1, 0);
    for (size_t i = 0; i < n; ++i) flag_offset[i + 1] = flag_offset[i] + key_steps[i]->n_groups;
    // One scratch per thread; thread_local keeps buffers warm across calls without sharing them.
    parallel_for(n, options.threads, 16, [&](size_t i) {
        thread_local Scratch scratch;
        matched[i] = match_one(texts[i], *key_steps[i], options, scratch,
                               group_flags ? group_flags + flag_offset[i] : nullptr);
    });
}

}  // namespace r1vl::keystep
