#include "matcher.hpp"

#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

#include "text.hpp"

namespace r1vl::keystep {

KeySteps compile(const std::vector<Group>& groups, Mode mode, size_t min_alt_len) {
    KeySteps ks;
    ks.n_groups = static_cast<uint32_t>(groups.size());
    ks.always.assign(groups.size(), 0);
    ks.matchable.assign(groups.size(), 0);
    std::vector<std::pair<u32string, uint32_t>> patterns;
    u32string prepared, tmp;
    for (uint32_t g = 0; g < groups.size(); ++g) {
        for (const u32string& alt : groups[g]) {
            if (mode == Mode::kR1VL) {
                lower(alt, prepared);
            } else {
                normalize(alt, prepared, tmp);
            }
            if (prepared.size() < min_alt_len) continue;
            if (prepared.empty()) {
                // `"" in text` is always true in the released code; the paper presets reject empty alternatives.
                if (mode == Mode::kR1VL) ks.always[g] = ks.matchable[g] = 1;
                continue;
            }
            ks.matchable[g] = 1;
            patterns.emplace_back(prepared, g);
            if (mode == Mode::kFuzzy) ks.fuzzy.emplace_back(Needle(prepared), g);
        }
        ks.n_matchable += ks.matchable[g];
    }
    ks.exact.build(patterns, ks.n_groups);
    return ks;
}

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
    std::vector<uint8_t> flags;
    std::vector<uint64_t> found;
    std::vector<Segment> segments;
    std::vector<uint16_t> classes;
};

int32_t match_one(const TextView& view, const KeySteps& ks, const Options& o, Scratch& scratch, uint8_t* out_flags) {
    std::vector<uint8_t>& flags = scratch.flags;
    flags.assign(ks.always.begin(), ks.always.end());
    uint32_t found = 0;
    for (uint8_t f : flags) found += f;
    if (found < ks.n_matchable) {
        scratch.found.assign(ks.exact.mask_words(), 0);
        const AhoCorasick& ac = ks.exact;
        std::vector<uint16_t>& cls = scratch.classes;
        cls.clear();
        if (o.mode == Mode::kR1VL && view.kind == 1 && ac.lane_scannable()) {
            // Latin-1 text: map the step sections straight to classes; lower-casing is folded into the map.
            const auto* s = static_cast<const uint8_t*>(view.data);
            if (o.scope == Scope::kSteps) {
                step_segments(view, scratch.segments);
                for (size_t k = 0; k < scratch.segments.size(); ++k) {
                    if (k) cls.push_back(ac.class_of_char(U' '));
                    const Segment& seg = scratch.segments[k];
                    ac.classes_of(s + seg.begin, seg.end - seg.begin, /*lowered_latin1=*/true, cls);
                }
            } else {
                ac.classes_of(s, view.length, /*lowered_latin1=*/true, cls);
            }
            ac.scan_classes(cls.data(), cls.size(), scratch.found.data());
        } else {
            prepare_text(view, o.mode, o.scope, scratch.text, scratch.tmp1, scratch.tmp2);
            if (ac.lane_scannable()) {
                ac.classes_of(scratch.text.data(), scratch.text.size(), false, cls);
                ac.scan_classes(cls.data(), cls.size(), scratch.found.data());
            } else {
                AhoCorasick::Cursor cursor{0, scratch.found.data()};
                ac.feed(scratch.text.data(), scratch.text.size(), cursor);
            }
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
