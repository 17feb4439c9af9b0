// Placeholder until the service lands (disaggregated-serving issue).
#include <cstdio>
int main() {
  std::fprintf(stderr, "not built yet\n");
  return 1;
}
