#include "aho_corasick.hpp"

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

void AhoCorasick::build(const std::vector<std::pair<u32string, uint32_t>>& patterns, uint32_t n_groups) {
    alphabet_ = Alphabet();
    rows16_.clear();
    rows32_.clear();
    edges_.clear();
    edge_begin_.clear();
    fail_.clear();
    size_t max_states = 1;
    max_pattern_ = 0;
    for (const auto& [p, g] : patterns) {
        for (char32_t c : p) alphabet_.add(c);
        max_states += p.size();
        max_pattern_ = std::max(max_pattern_, p.size());
    }
    width_ = alphabet_.size();
    shift_ = 0;
    while ((size_t{1} << shift_) < width_) ++shift_;
    words_ = std::max<size_t>(1, (n_groups + 63) / 64);
    for (uint32_t c = 0; c < 256; ++c) byte_class_[c] = alphabet_(c);
    const size_t entries = max_states << shift_;
    if (entries > kMaxDenseEntries || width_ > 65535) {
        build_sparse(patterns);
    } else if (entries <= 65536) {
        build_dense(patterns, max_states, rows16_);
    } else {
        build_dense(patterns, max_states, rows32_);
    }
}

template <typename T>
void AhoCorasick::build_dense(const std::vector<std::pair<u32string, uint32_t>>& patterns, size_t max_states,
                              std::vector<T>& rows) {
    // Trie: rows hold child row offsets (0 = no edge: the root is nobody's child); each state's
    // children are also kept in a linked list (head/next) with the class of its incoming edge.
    rows.assign(max_states << shift_, 0);
    out_.assign(max_states * words_, 0);
    std::vector<uint32_t> head(max_states, 0), next(max_states, 0), edge_class(max_states, 0);
    n_states_ = 1;
    for (const auto& [p, g] : patterns) {
        uint32_t s = 0;
        for (char32_t c : p) {
            const uint32_t cls = alphabet_(c);
            T& slot = rows[(static_cast<size_t>(s) << shift_) + cls];
            if (!slot) {
                const uint32_t child = n_states_++;
                slot = static_cast<T>(child << shift_);
                edge_class[child] = cls;
                next[child] = head[s];
                head[s] = child;
            }
            s = static_cast<uint32_t>(slot) >> shift_;
        }
        out_[s * words_ + g / 64] |= uint64_t{1} << (g % 64);
    }
    // Breadth-first: a state's row starts as a copy of its failure state's (complete) row, then its own
    // children are put back; failure links of the children and output masks follow.
    std::vector<uint32_t> fail(n_states_, 0), queue;
    queue.reserve(n_states_);
    queue.push_back(0);
    for (size_t at = 0; at < queue.size(); ++at) {
        const uint32_t s = queue[at];
        T* row = &rows[static_cast<size_t>(s) << shift_];
        const T* fail_row = &rows[static_cast<size_t>(fail[s]) << shift_];
        if (s != 0) {
            std::copy(fail_row, fail_row + width_, row);
            for (size_t w = 0; w < words_; ++w) out_[s * words_ + w] |= out_[fail[s] * words_ + w];
        }
        for (uint32_t c = head[s]; c != 0; c = next[c]) {
            row[edge_class[c]] = static_cast<T>(c << shift_);
            fail[c] = (s == 0) ? 0 : static_cast<uint32_t>(fail_row[edge_class[c]]) >> shift_;
            queue.push_back(c);
        }
    }
    rows.resize(static_cast<size_t>(n_states_) << shift_);
    out_.resize(static_cast<size_t>(n_states_) * words_);
}

void AhoCorasick::build_sparse(const std::vector<std::pair<u32string, uint32_t>>& patterns) {
    std::vector<std::map<uint32_t, uint32_t>> children(1);
    out_.assign(words_, 0);
    for (const auto& [p, g] : patterns) {
        uint32_t s = 0;
        for (char32_t c : p) {
            const uint32_t cls = alphabet_(c);
            auto it = children[s].find(cls);
            if (it == children[s].end()) {
                const auto child = static_cast<uint32_t>(children.size());
                children[s].emplace(cls, child);
                children.emplace_back();
                out_.resize(children.size() * words_, 0);
                s = child;
            } else {
                s = it->second;
            }
        }
        out_[s * words_ + g / 64] |= uint64_t{1} << (g % 64);
    }
    n_states_ = static_cast<uint32_t>(children.size());
    edge_begin_.assign(n_states_ + 1, 0);
    for (uint32_t s = 0; s < n_states_; ++s) {
        edge_begin_[s] = static_cast<uint32_t>(edges_.size());
        edges_.insert(edges_.end(), children[s].begin(), children[s].end());
    }
    edge_begin_[n_states_] = static_cast<uint32_t>(edges_.size());
    fail_.assign(n_states_, 0);
    std::vector<uint32_t> queue{0};
    for (size_t head = 0; head < queue.size(); ++head) {
        const uint32_t s = queue[head];
        if (s != 0)
            for (size_t w = 0; w < words_; ++w) out_[s * words_ + w] |= out_[fail_[s] * words_ + w];
        for (const auto& [cls, child] : children[s]) {
            fail_[child] = (s == 0) ? 0 : sparse_step(fail_[s], cls);
            queue.push_back(child);
        }
    }
}

}  // namespace r1vl::keystep
