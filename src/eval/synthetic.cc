#include "eval/synthetic.h"

#include <algorithm>
#include <array>
#include <utility>

namespace cachette::eval {
namespace {

// splitmix64: tiny, counter-based, identical everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : x_(seed) {}
  uint64_t Next() {
    uint64_t z = (x_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) (n > 0; the modulo bias is irrelevant at these sizes).
  size_t Below(size_t n) { return static_cast<size_t>(Next() % n); }
  template <typename T, size_t N>
  const T& Pick(const std::array<T, N>& a) {
    return a[Below(N)];
  }

 private:
  uint64_t x_;
};

constexpr std::array<std::string_view, 24> kOnsets = {
    "b",  "br", "ch", "d", "dr", "f", "fl", "g",  "gr", "h",  "j",  "k",
    "kl", "l",  "m",  "n", "qu", "r", "sh", "sk", "st", "th", "tr", "z"};
constexpr std::array<std::string_view, 12> kVowels = {"a",  "e",  "i",  "o", "u",  "ai",
                                                      "ea", "ie", "ou", "y", "oa", "ei"};
constexpr std::array<std::string_view, 12> kCodas = {"",   "n",  "r", "l",  "x",  "sh",
                                                     "rk", "nd", "m", "ll", "th", "s"};
constexpr std::array<std::string_view, 14> kColours = {
    "red",   "blue",  "green",  "yellow", "purple", "orange", "black",
    "white", "brown", "silver", "golden", "amber",  "teal",   "crimson"};
constexpr std::array<std::string_view, 8> kAnimals = {"cat",  "dog",    "parrot", "horse",
                                                      "goat", "ferret", "canary", "rabbit"};
constexpr std::array<std::string_view, 8> kJobs = {"pilot",  "baker",  "teacher", "doctor",
                                                   "farmer", "sailor", "weaver",  "miller"};
constexpr std::array<std::string_view, 10> kGoods = {"rope",  "lace",    "violins",   "pottery",
                                                     "glass", "cheese",  "umbrellas", "clocks",
                                                     "bells", "lanterns"};
constexpr std::array<std::string_view, 3> kWaters = {"lake", "river", "sea"};
constexpr std::array<std::string_view, 4> kFirmSuffix = {"Ltd", "Company", "Trading", "Works"};

std::string Word(Rng& rng, int syllables) {
  std::string w;
  for (int i = 0; i < syllables; ++i) {
    w += rng.Pick(kOnsets);
    w += rng.Pick(kVowels);
    w += rng.Pick(kCodas);
  }
  return w;
}

std::string Name(Rng& rng) {
  std::string w = Word(rng, 2 + static_cast<int>(rng.Below(2)));
  w[0] = static_cast<char>(w[0] - 'a' + 'A');
  return w;
}

// `count` distinct values from `make`.
template <typename F>
std::vector<std::string> Distinct(size_t count, F make) {
  std::vector<std::string> out;
  while (out.size() < count) {
    std::string s = make();
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(std::move(s));
  }
  return out;
}

QaItem KvTask(Rng& rng, int approx_chars) {
  const size_t n = std::max<size_t>(4, static_cast<size_t>(approx_chars) / 17);
  const auto keys = Distinct(n, [&] { return Word(rng, 2 + static_cast<int>(rng.Below(2))); });
  QaItem q;
  q.kind = "kv";
  q.prompt = "Here is a table of keys and values.\n";
  const size_t target = rng.Below(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string colour(rng.Pick(kColours));
    if (i == target) q.answer = colour;
    q.prompt += keys[i] + " is " + colour + "\n";
  }
  q.prompt += "\nQuestion: What is the value of " + keys[target] + "?\nAnswer:";
  return q;
}

Result<QaItem> NeedleTask(Rng& rng, int approx_chars, std::string_view filler) {
  if (filler.size() < static_cast<size_t>(approx_chars) * 2) {
    return InvalidArgument("needle tasks need at least " + std::to_string(approx_chars * 2) +
                           " bytes of filler text, got " + std::to_string(filler.size()));
  }
  // A slice of whole lines at a drawn offset.
  size_t begin = rng.Below(filler.size() - approx_chars);
  begin = filler.find('\n', begin) + 1;
  size_t end = filler.find('\n', std::min(filler.size() - 1, begin + approx_chars));
  if (end == std::string_view::npos) end = filler.size();
  std::string hay(filler.substr(begin, end - begin));
  // The needle goes at a line boundary at a drawn depth.
  size_t at = hay.find('\n', rng.Below(hay.size()));
  at = at == std::string::npos ? hay.size() : at + 1;
  QaItem q;
  q.kind = "needle";
  const std::string name = Name(rng);
  q.answer = std::to_string(100000 + rng.Below(900000));
  hay.insert(at, "\nThe secret number of " + name + " is " + q.answer + ".\n\n");
  q.prompt = hay + "\n\nQuestion: What is the secret number of " + name + "?\nAnswer:";
  return q;
}

QaItem FactsTask(Rng& rng, int approx_chars) {
  // About 130 characters a record.
  const size_t n_records = std::max<size_t>(6, static_cast<size_t>(approx_chars) / 130);
  const size_t n_towns = std::max<size_t>(2, n_records / 3);
  const size_t n_people = std::max<size_t>(2, n_records / 3);
  const size_t n_firms = n_records - n_towns - n_people;
  const auto towns = Distinct(n_towns, [&] { return Name(rng); });
  const auto people = Distinct(n_people, [&] { return Name(rng) + " " + Name(rng); });
  const auto firms =
      Distinct(n_firms, [&] { return Name(rng) + " " + std::string(rng.Pick(kFirmSuffix)); });
  struct Town {
    std::string good, year;
  };
  struct Person {
    size_t town;
    bool she;
    std::string colour;
  };
  struct Firm {
    size_t founder;
  };
  std::vector<Town> town(n_towns);
  std::vector<Person> person(n_people);
  std::vector<Firm> firm(n_firms);
  // records[i] = (text without "Record i - ", the entity it describes).
  std::vector<std::pair<std::string, std::string>> records;
  for (size_t i = 0; i < n_towns; ++i) {
    town[i] = {std::string(rng.Pick(kGoods)), std::to_string(1000 + rng.Below(1000))};
    records.push_back({"The town of " + towns[i] + " lies on the " +
                           std::string(rng.Pick(kWaters)) + " " + Name(rng) +
                           ". It was founded in " + town[i].year + ". " + towns[i] +
                           " is known for its " + town[i].good + ".",
                       towns[i]});
  }
  for (size_t i = 0; i < n_people; ++i) {
    person[i] = {rng.Below(n_towns), rng.Below(2) == 0, std::string(rng.Pick(kColours))};
    const char* pro = person[i].she ? "She" : "He";
    records.push_back({people[i] + " was born in " + towns[person[i].town] + ". " + pro +
                           " has a " + std::string(rng.Pick(kAnimals)) + " called " + Name(rng) +
                           ". " + pro + " works as a " + std::string(rng.Pick(kJobs)) + ". " +
                           (person[i].she ? "Her" : "His") + " favourite colour is " +
                           person[i].colour + ".",
                       people[i]});
  }
  for (size_t i = 0; i < n_firms; ++i) {
    firm[i] = {rng.Below(n_people)};
    records.push_back({firms[i] + " is a company based in " + towns[rng.Below(n_towns)] +
                           ". It was founded by " + people[firm[i].founder] + " in " +
                           std::to_string(1800 + rng.Below(220)) + ". The company makes " +
                           std::string(rng.Pick(kGoods)) + ".",
                       firms[i]});
  }
  // The question and the two records it needs.
  QaItem q;
  q.kind = "facts";
  std::string first, second;
  const size_t p = rng.Below(n_people);
  switch (n_firms > 0 ? rng.Below(4) : rng.Below(2)) {
    case 0:
      q.prompt = "In which year was the birthplace of " + people[p] + " founded?";
      q.answer = town[person[p].town].year;
      first = people[p], second = towns[person[p].town];
      break;
    case 1:
      q.prompt = "What is the birthplace of " + people[p] + " known for?";
      q.answer = town[person[p].town].good;
      first = people[p], second = towns[person[p].town];
      break;
    case 2: {
      const size_t f = rng.Below(n_firms);
      q.prompt = "What is the favourite colour of the founder of " + firms[f] + "?";
      q.answer = person[firm[f].founder].colour;
      first = firms[f], second = people[firm[f].founder];
      break;
    }
    default: {
      const size_t f = rng.Below(n_firms);
      q.prompt = "Where was the founder of " + firms[f] + " born?";
      q.answer = towns[person[firm[f].founder].town];
      first = firms[f], second = people[firm[f].founder];
      break;
    }
  }
  // Shuffle, then move the two linked records to the first and the last quarter.
  for (size_t i = records.size(); i > 1; --i) std::swap(records[i - 1], records[rng.Below(i)]);
  auto place = [&](const std::string& entity, size_t lo, size_t hi) {
    auto it = std::find_if(records.begin(), records.end(),
                           [&](const auto& r) { return r.second == entity; });
    std::swap(*it, records[lo + rng.Below(hi - lo)]);
  };
  const size_t quarter = std::max<size_t>(1, records.size() / 4);
  if (rng.Below(2) == 0) std::swap(first, second);
  place(first, 0, quarter);
  place(second, records.size() - quarter, records.size());
  std::string text;
  for (size_t i = 0; i < records.size(); ++i) {
    text += "Record " + std::to_string(i + 1) + " - " + records[i].first + "\n\n";
  }
  q.prompt = text + "Question: " + q.prompt + "\nAnswer:";
  return q;
}

}  // namespace

Result<std::vector<QaItem>> GenerateSyntheticTasks(const SyntheticOptions& options) {
  if (options.n < 0) return InvalidArgument("negative task count");
  if (options.approx_chars < 200) {
    return InvalidArgument("synthetic prompts need at least 200 characters, got " +
                           std::to_string(options.approx_chars));
  }
  if (options.kinds.empty()) return InvalidArgument("no synthetic task kinds given");
  for (const std::string& k : options.kinds) {
    if (k != "kv" && k != "needle" && k != "facts") {
      return InvalidArgument("unknown synthetic task kind '" + k + "' (kv, needle, facts)");
    }
  }
  std::vector<QaItem> items;
  for (int i = 0; i < options.n; ++i) {
    // One stream per task, so a task does not change when n or the kinds around it change.
    Rng rng(options.seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    const std::string& kind = options.kinds[i % options.kinds.size()];
    if (kind == "kv") {
      items.push_back(KvTask(rng, options.approx_chars));
    } else if (kind == "needle") {
      CT_ASSIGN_OR_RETURN(QaItem q, NeedleTask(rng, options.approx_chars, options.filler));
      items.push_back(std::move(q));
    } else {
      items.push_back(FactsTask(rng, options.approx_chars));
    }
  }
  return items;
}

}  // namespace cachette::eval
