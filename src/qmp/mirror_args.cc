#include "qmp/mirror_args.h"

#include "mirror/option_table.h"

namespace blkmirror::qmp {

namespace {

Type qmp_type(OptionType t) {
  switch (t) {
    case OptionType::kSize:
    case OptionType::kInteger:
      return Type::kInt;
    case OptionType::kEnum:
      return Type::kEnum;
    case OptionType::kBool:
      return Type::kBool;
  }
  return Type::kAny;
}

}  // namespace

std::vector<Field> mirror_option_fields() {
  std::vector<Field> out;
  for (const MirrorOption& o : mirror_options())
    out.emplace_back(std::string(o.name), qmp_type(o.type), o.qmp_required,
                     std::vector<std::string>(o.words.begin(), o.words.end()));
  return out;
}

Result<void> set_mirror_options(MirrorParams& p, const Json& a) {
  for (const MirrorOption& o : mirror_options()) {
    auto it = a.find(std::string(o.name));
    if (it == a.end()) continue;
    OptionValue v = o.type == OptionType::kBool   ? OptionValue{it->get<bool>()}
                    : o.type == OptionType::kEnum ? OptionValue{it->get<std::string>()}
                                                  : OptionValue{it->get<int64_t>()};
    if (auto r = set_option(p, o, v, o.name); !r) return r;
  }
  return {};
}

}  // namespace blkmirror::qmp
