static int sq(int x) { return x * x; }
int main(int argc, char **argv) { (void)argv; return sq(argc) + 1; }
