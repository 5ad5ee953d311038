// Python binding of the key-step matcher: converts types, validates key steps (errors name the item),
// releases the GIL and batches. All matching logic lives in keystep/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <unordered_map>

#include "keystep/matcher.hpp"
#include "keystep/text.hpp"

namespace py = pybind11;
using namespace r1vl::keystep;

namespace {

std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

TextView view_of(PyObject* o) {
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(o) < 0) throw py::error_already_set();
#endif
    return TextView{PyUnicode_DATA(o), static_cast<size_t>(PyUnicode_GET_LENGTH(o)), static_cast<int>(PyUnicode_KIND(o))};
}

// Error paths are only spelled out when something is wrong (building them eagerly costs more than matching).
template <typename Where>
TextView checked_view(PyObject* o, Where&& where) {
    if (!PyUnicode_Check(o)) throw py::type_error(where() + " must be str, got " + type_name(o));
    return view_of(o);
}

u32string to_u32(PyObject* o) {
    u32string out;
    copy_append(view_of(o), out);
    return out;
}

py::str from_u32(const u32string& s) {
    PyObject* o = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, s.data(), static_cast<Py_ssize_t>(s.size()));
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

std::string item_path(size_t index, bool in_dict) {
    return "key_steps[" + std::to_string(index) + "]" + (in_dict ? "['Steps']" : "");
}

// A key_steps item: {"Steps": [group, ...]} (R1-VL-10K) or a plain list of groups; a group is a str or a
// list of alternative strs.
GroupList parse_item(PyObject* item, size_t index) {
    PyObject* steps = item;
    const bool in_dict = PyDict_Check(item);
    if (in_dict) {
        static PyObject* const key = PyUnicode_InternFromString("Steps");  // immortal for the module's life
        steps = PyDict_GetItemWithError(item, key);
        if (!steps && PyErr_Occurred()) throw py::error_already_set();
        if (!steps)
            throw py::value_error(item_path(index, false) + ": dict has no 'Steps' key (expected {\"Steps\": [group, ...]})");
    }
    if (!PyList_Check(steps) && !PyTuple_Check(steps))
        throw py::value_error(item_path(index, in_dict) +
                              ": expected a list of key-step groups (or a dict with 'Steps'), got " + type_name(steps));
    GroupList groups;
    const Py_ssize_t n_groups = PySequence_Fast_GET_SIZE(steps);
    groups.group_end.reserve(static_cast<size_t>(n_groups));
    for (Py_ssize_t g = 0; g < n_groups; ++g) {
        PyObject* group = PySequence_Fast_GET_ITEM(steps, g);
        if (PyUnicode_Check(group)) {
            copy_append(view_of(group), groups.chars);
            groups.end_alternative();
        } else if (PyList_Check(group) || PyTuple_Check(group)) {
            const Py_ssize_t n_alts = PySequence_Fast_GET_SIZE(group);
            for (Py_ssize_t a = 0; a < n_alts; ++a) {
                PyObject* alt = PySequence_Fast_GET_ITEM(group, a);
                if (!PyUnicode_Check(alt))
                    throw py::value_error(item_path(index, in_dict) + "[" + std::to_string(g) + "][" +
                                          std::to_string(a) + "]: alternative must be str, got " + type_name(alt));
                copy_append(view_of(alt), groups.chars);
                groups.end_alternative();
            }
        } else {
            throw py::value_error(item_path(index, in_dict) + "[" + std::to_string(g) +
                                  "]: group must be str or list of str, got " + type_name(group));
        }
        groups.end_group();
    }
    return groups;
}

Mode to_mode(int m) {
    if (m < 0 || m > 2) throw py::value_error("mode must be 0 (r1vl), 1 (normalized) or 2 (fuzzy)");
    return static_cast<Mode>(m);
}

Scope to_scope(int s) {
    if (s < 0 || s > 1) throw py::value_error("scope must be 0 (steps) or 1 (all)");
    return static_cast<Scope>(s);
}

std::vector<KeySteps> compile_many(const std::vector<GroupList>& parsed, Mode mode, size_t min_alt_len,
                                   int threads) {
    std::vector<KeySteps> out(parsed.size());
    parallel_for(parsed.size(), threads, 64, [&](size_t i) { out[i] = compile(parsed[i], mode, min_alt_len); });
    return out;
}

struct CompiledKeySteps {
    std::vector<KeySteps> samples;
    Mode mode;
    size_t min_alt_len;
};

std::vector<TextView> texts_of(const py::sequence& texts, std::vector<py::object>& keep_alive) {
    std::vector<TextView> views;
    const size_t n = py::len(texts);
    views.reserve(n);
    keep_alive.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        keep_alive.push_back(texts[i]);
        views.push_back(checked_view(keep_alive.back().ptr(), [i] { return "texts[" + std::to_string(i) + "]"; }));
    }
    return views;
}

py::tuple run_match(const std::vector<TextView>& views, const std::vector<const KeySteps*>& ks, const Options& options,
                    bool return_groups) {
    const size_t n = views.size();
    py::array_t<int32_t> matched(static_cast<py::ssize_t>(n));
    py::array_t<int32_t> totals(static_cast<py::ssize_t>(n));
    size_t total_flags = 0;
    for (size_t i = 0; i < n; ++i) {
        totals.mutable_at(i) = static_cast<int32_t>(ks[i]->n_groups);
        total_flags += ks[i]->n_groups;
    }
    py::object flags = py::none();
    uint8_t* flag_ptr = nullptr;
    if (return_groups) {
        py::array_t<uint8_t> arr(static_cast<py::ssize_t>(total_flags));
        flag_ptr = arr.mutable_data();
        flags = arr;
    }
    int32_t* matched_ptr = matched.mutable_data();
    {
        py::gil_scoped_release release;
        match_batch(views, ks, options, matched_ptr, flag_ptr);
    }
    return py::make_tuple(matched, totals, flags);
}

}  // namespace

PYBIND11_MODULE(_keystep, m) {
    m.doc() = "Batched key-step matching for StepRAR (exact: q-gram filter with an Aho-Corasick fallback; normalised; fuzzy partial_ratio).";

    py::class_<CompiledKeySteps, std::shared_ptr<CompiledKeySteps>>(m, "CompiledKeySteps")
        .def(py::init([](const py::sequence& key_steps, int mode, size_t min_alt_len, int threads) {
                 auto self = std::make_shared<CompiledKeySteps>();
                 self->mode = to_mode(mode);
                 self->min_alt_len = min_alt_len;
                 std::vector<GroupList> parsed;
                 const size_t n = py::len(key_steps);
                 parsed.reserve(n);
                 for (size_t i = 0; i < n; ++i) parsed.push_back(parse_item(py::object(key_steps[i]).ptr(), i));
                 py::gil_scoped_release release;
                 self->samples = compile_many(parsed, self->mode, min_alt_len, threads);
                 return self;
             }),
             py::arg("key_steps"), py::arg("mode"), py::arg("min_alt_len") = 0, py::arg("threads") = 0)
        .def("__len__", [](const CompiledKeySteps& c) { return c.samples.size(); })
        .def_property_readonly("mode", [](const CompiledKeySteps& c) { return static_cast<int>(c.mode); })
        .def_property_readonly("min_alt_len", [](const CompiledKeySteps& c) { return c.min_alt_len; })
        .def("group_counts", [](const CompiledKeySteps& c) {
            py::array_t<int32_t> out(static_cast<py::ssize_t>(c.samples.size()));
            for (size_t i = 0; i < c.samples.size(); ++i) out.mutable_at(i) = static_cast<int32_t>(c.samples[i].n_groups);
            return out;
        });

    m.def(
        "match_compiled",
        [](const py::sequence& texts, std::shared_ptr<CompiledKeySteps> compiled,
           py::array_t<int64_t, py::array::c_style | py::array::forcecast> indices, int scope, double threshold,
           int threads, bool return_groups) {
            std::vector<py::object> keep_alive;
            const std::vector<TextView> views = texts_of(texts, keep_alive);
            if (static_cast<size_t>(indices.size()) != views.size())
                throw py::value_error("got " + std::to_string(views.size()) + " texts but " +
                                      std::to_string(indices.size()) + " key-step entries");
            std::vector<const KeySteps*> ks(views.size());
            for (size_t i = 0; i < views.size(); ++i) {
                const int64_t k = indices.at(i);
                if (k < 0 || static_cast<size_t>(k) >= compiled->samples.size())
                    throw py::index_error("key-step index " + std::to_string(k) + " for texts[" + std::to_string(i) +
                                          "] is out of range for " + std::to_string(compiled->samples.size()) +
                                          " compiled samples");
                ks[i] = &compiled->samples[static_cast<size_t>(k)];
            }
            Options options{compiled->mode, to_scope(scope), threshold, threads};
            return run_match(views, ks, options, return_groups);
        },
        py::arg("texts"), py::arg("compiled"), py::arg("indices"), py::arg("scope"), py::arg("threshold"),
        py::arg("threads"), py::arg("return_groups"));

    m.def(
        "match_raw",
        [](const py::sequence& texts, const py::sequence& key_steps, int mode, int scope, double threshold,
           size_t min_alt_len, int threads, bool return_groups) {
            std::vector<py::object> keep_alive;
            const std::vector<TextView> views = texts_of(texts, keep_alive);
            const size_t n = views.size();
            if (static_cast<size_t>(py::len(key_steps)) != n)
                throw py::value_error("got " + std::to_string(n) + " texts but " + std::to_string(py::len(key_steps)) +
                                      " key_steps items");
            // The G completions of a prompt usually share one key_steps object: parse and compile it once.
            std::vector<py::object> items;
            items.reserve(n);
            std::unordered_map<PyObject*, size_t> unique_index;
            std::vector<GroupList> parsed;
            std::vector<size_t> sample_of(n);
            for (size_t i = 0; i < n; ++i) {
                items.push_back(key_steps[i]);
                PyObject* p = items.back().ptr();
                auto [it, inserted] = unique_index.emplace(p, parsed.size());
                if (inserted) parsed.push_back(parse_item(p, i));
                sample_of[i] = it->second;
            }
            const Mode m = to_mode(mode);
            std::vector<KeySteps> compiled;
            {
                py::gil_scoped_release release;
                compiled = compile_many(parsed, m, min_alt_len, threads);
            }
            std::vector<const KeySteps*> ks(n);
            for (size_t i = 0; i < n; ++i) ks[i] = &compiled[sample_of[i]];
            Options options{m, to_scope(scope), threshold, threads};
            return run_match(views, ks, options, return_groups);
        },
        py::arg("texts"), py::arg("key_steps"), py::arg("mode"), py::arg("scope"), py::arg("threshold"),
        py::arg("min_alt_len"), py::arg("threads"), py::arg("return_groups"));

    // Building blocks, exposed so tests can hold each against its Python twin.
    m.def("_set_simd", &QGramFilter::set_simd, py::arg("enabled"),
          "Allow (True) or forbid (False) the AVX2 scan; returns the previous setting. For tests.");
    m.def("_simd_available", &QGramFilter::simd_available, "Whether the AVX2 scan is in use (CPU has it, not turned off).");
    m.def("lower", [](const py::str& s) {
        u32string out;
        lower(to_u32(s.ptr()), out);
        return from_u32(out);
    });
    m.def("normalize", [](const py::str& s) {
        u32string out, tmp;
        normalize(to_u32(s.ptr()), out, tmp);
        return from_u32(out);
    });
    m.def("extract_steps", [](const py::str& s) {
        u32string out;
        extract_steps_append(view_of(s.ptr()), out);
        return from_u32(out);
    });
    m.def("prepare_text", [](const py::str& s, int mode, int scope) {
        u32string out, t1, t2;
        prepare_text(view_of(s.ptr()), to_mode(mode), to_scope(scope), out, t1, t2);
        return from_u32(out);
    });
    m.def("partial_ratio", [](const py::str& a, const py::str& b) {
        return partial_ratio(to_u32(a.ptr()), to_u32(b.ptr()));
    });
    m.def("partial_ratio_reaches", [](const py::str& needle, const py::str& haystack, double threshold) {
        return partial_ratio_reaches(Needle(to_u32(needle.ptr())), to_u32(haystack.ptr()),
                                     threshold);
    });
}
