#include "aho_corasick.hpp"

#include <deque>
#include <map>

namespace r1vl::keystep {

uint32_t Alphabet::add(char32_t c) {
    if (c < 128) {
        if (!ascii_[c]) ascii_[c] = n_classes_++;
        return ascii_[c];
    }
    auto it = std::lower_bound(other_.begin(), other_.end(), std::make_pair(c, uint32_t{0}));
    if (it != other_.end() && it->first == c) return it->second;
    other_.insert(it, {c, n_classes_});
    return n_classes_++;
}

uint32_t AhoCorasick::goto_edge(uint32_t state, uint32_t cls) const {
    auto b = edges_.begin() + edge_begin_[state], e = edges_.begin() + edge_begin_[state + 1];
    auto it = std::lower_bound(b, e, std::make_pair(cls, uint32_t{0}));
    return (it != e && it->first == cls) ? it->second : kNone;
}

uint32_t AhoCorasick::sparse_step(uint32_t state, uint32_t cls) const {
    if (cls == 0) return 0;  // a character of no pattern leads back to the root
    for (;;) {
        const uint32_t next = goto_edge(state, cls);
        if (next != kNone) return next;
        if (state == 0) return 0;
        state = fail_[state];
    }
}

void AhoCorasick::build(const std::vector<std::pair<u32string, uint32_t>>& patterns) {
    alphabet_ = Alphabet();
    for (const auto& [p, g] : patterns)
        for (char32_t c : p) alphabet_.add(c);
    const uint32_t width = alphabet_.size();

    // Trie with ordered children (BFS order below visits classes in order).
    std::vector<std::map<uint32_t, uint32_t>> children(1);
    std::vector<std::vector<uint32_t>> own(1);
    for (const auto& [p, g] : patterns) {
        uint32_t s = 0;
        for (char32_t c : p) {
            const uint32_t cls = alphabet_(c);
            auto it = children[s].find(cls);
            if (it == children[s].end()) {
                const auto child = static_cast<uint32_t>(children.size());
                children[s].emplace(cls, child);
                children.emplace_back();
                own.emplace_back();
                s = child;
            } else {
                s = it->second;
            }
        }
        if (std::find(own[s].begin(), own[s].end(), g) == own[s].end()) own[s].push_back(g);
    }
    n_states_ = static_cast<uint32_t>(children.size());
    edge_begin_.assign(n_states_ + 1, 0);
    edges_.clear();
    for (uint32_t s = 0; s < n_states_; ++s) {
        edge_begin_[s] = static_cast<uint32_t>(edges_.size());
        edges_.insert(edges_.end(), children[s].begin(), children[s].end());
    }
    edge_begin_[n_states_] = static_cast<uint32_t>(edges_.size());

    // Breadth-first: failure links and output sets merged along them (dictionary links, deduplicated).
    fail_.assign(n_states_, 0);
    std::vector<std::vector<uint32_t>> outs(n_states_);
    std::vector<uint32_t> order;
    order.reserve(n_states_);
    std::deque<uint32_t> queue{0};
    while (!queue.empty()) {
        const uint32_t s = queue.front();
        queue.pop_front();
        order.push_back(s);
        outs[s] = own[s];
        if (s != 0)
            for (uint32_t g : outs[fail_[s]])
                if (std::find(outs[s].begin(), outs[s].end(), g) == outs[s].end()) outs[s].push_back(g);
        for (const auto& [cls, child] : children[s]) {
            fail_[child] = (s == 0) ? 0 : sparse_step(fail_[s], cls);
            queue.push_back(child);
        }
    }
    out_begin_.assign(n_states_ + 1, 0);
    out_groups_.clear();
    for (uint32_t s = 0; s < n_states_; ++s) {
        out_begin_[s] = static_cast<uint32_t>(out_groups_.size());
        out_groups_.insert(out_groups_.end(), outs[s].begin(), outs[s].end());
    }
    out_begin_[n_states_] = static_cast<uint32_t>(out_groups_.size());

    delta_.clear();
    if (static_cast<size_t>(n_states_) * width > kMaxDenseEntries) return;
    delta_.assign(static_cast<size_t>(n_states_) * width, 0);
    for (uint32_t s : order) {  // parents and failure targets come first in BFS order
        uint32_t* row = &delta_[static_cast<size_t>(s) * width];
        if (s != 0) {
            const uint32_t* fail_row = &delta_[static_cast<size_t>(fail_[s]) * width];
            std::copy(fail_row, fail_row + width, row);
        }
        for (const auto& [cls, child] : children[s]) row[cls] = child;
    }
}

}  // namespace r1vl::keystep
