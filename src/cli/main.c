#include <stdio.h>
int main(void) { puts("bam: under construction"); return 0; }
