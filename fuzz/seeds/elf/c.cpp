namespace ns { template <typename T> struct Box { T v; __attribute__((noinline)) T get() const { return v + 1; } }; }
int main(int argc, char **) { ns::Box<int> b{argc}; return b.get(); }
